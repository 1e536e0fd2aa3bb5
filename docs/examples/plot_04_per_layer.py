"""
Which layers are sharp: per-layer curvature
===========================================

λ_max and the trace of each layer's diagonal block of the Hessian (the curvature along that layer's parameters
only), for a small-batch and a large-batch network trained from the same initial weights. What
``python -m minima.sharpness SB.pt LB.pt --metrics hessian trace --blocks layers`` computes.
"""

import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from minima import data
from minima.files import checkpoint, results
from minima.studies.sharpness import format_table, measure, measure_request_type
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=1024, n_test=512, image_shape=(3, 8, 8), noise=600.0, seed=0)
common = dict(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [64, 64]}, epochs=8, lr=1e-3,
              init_seed=0, progress=False)
sb = train(TrainConfig(**common, batch_size=32, out=str(work / "sb")), dataset=ds)
lb = train(TrainConfig(**common, batch_size=512, out=str(work / "lb")), dataset=ds)

# %%
# One request, both checkpoints, two metrics, one block per layer (``--blocks layers``). The results go into one
# HDF5 file, under ``sharpness/<checkpoint>/<metric>@<block>``.
request = measure_request_type()(checkpoints=[str(sb), str(lb)], metrics=("hessian", "trace"), blocks="layers",
                                 train_subset=512, out=str(work / "curvature.h5"))
rows = results.load_sharpness(measure(request))
print(format_table(rows))

# %%
# λ_max per layer, SB beside LB, each layer named with its module. With the same number of epochs the large batch
# has taken 16 times fewer steps (16 against 256) and is still far from a minimum — which is why it is the flatter
# one here; Keskar et al. train both until the loss stops improving.
blocks = list(dict.fromkeys(r["block"] for r in rows if r.get("block")))
model, _ = checkpoint.load_model(sb)
modules = dict(model.named_modules())
names = [f"{b}\n{type(modules[b]).__name__} {modules[b].in_features}→{modules[b].out_features}" for b in blocks]
fig = Figure(figsize=(7, 3.4), layout="constrained")
ax = fig.subplots()
for k, label in enumerate(("sb", "lb")):
    values = [next(r["value"] for r in rows if r["checkpoint_label"] == label and r.get("block") == b
                   and r["metric"].startswith("hessian")) for b in blocks]
    ax.bar(np.arange(len(blocks)) + (k - 0.5) * 0.4, values, width=0.4, label=label.upper(), color=f"C{k}")
ax.set_xticks(range(len(blocks)), names)
ax.set_yscale("log")
ax.set(ylabel="λ_max of the layer's Hessian block", title="per-layer sharpness, synthetic 3×8×8 data, 512 images")
ax.legend()
