"""
Your own metric, registered from your code
==========================================

A metric is a function of the objective (f, ∇f and H·v at the checkpoint's weights) and one registry entry. Its
command-line flags, request fields, HDF5 names and resume keys all follow from that entry: once registered, it is
used exactly like the built-in ones — by ``minima.sharpness``, by probes during training and by zoos. Here: the
p-norm of the gradient of the training loss, and the loss after a step of length r along −∇f.
"""

import tempfile
from pathlib import Path

from minima import data
from minima.curvature.registry import Metric, Param, register
from minima.files import results
from minima.studies.sharpness import format_table, measure, measure_request_type
from minima.studies.train import TrainConfig, train


def grad_norm(obj, x, f0, job, seed):
    """‖∇f(x)‖_p and f(x − r·∇f/‖∇f‖₂) − f(x): ``obj`` is the DatasetObjective, ``x`` the flat weights."""
    _, g = obj.value_and_grad(x)
    step = x - job["r"] * g / g.norm()
    return {"value": float(g.norm(job["p"])), "p": job["p"], "r": job["r"], "descent": obj.value(step) - f0}


register(Metric(
    name="gradnorm", summary="‖∇f‖_p, and the loss change after a step of length r down the gradient",
    params=(Param("grad_norm_p", float, 2.0, "p of the norm"),
            Param("grad_norm_r", float, 0.01, "length of the step down the gradient", "weights")),
    jobs=lambda p: [(f"gradnorm_p{p['grad_norm_p']:g}", {"p": p["grad_norm_p"], "r": p["grad_norm_r"]})],
    compute=grad_norm, fields=("p", "r", "descent"),
))

# %%
# Measure it on the same network after one epoch and after eight (the same initial weights and batches), both in one
# request and one file; ``grad_norm_p=1.0`` is ``--grad-norm-p 1`` on the command line.
work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=512, n_test=128, image_shape=(3, 8, 8), noise=400.0, seed=0)
common = dict(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [32]}, batch_size=32, lr=1e-3,
              init_seed=0, progress=False)
early = train(TrainConfig(**common, epochs=1, out=str(work / "early")), dataset=ds)
late = train(TrainConfig(**common, epochs=8, out=str(work / "late")), dataset=ds)

request = measure_request_type()(checkpoints=[str(early), str(late)], metrics=("gradnorm",), grad_norm_p=1.0,
                                 out=str(work / "gradnorm.h5"))
rows = results.load_sharpness(measure(request))
print(format_table(rows))
for r in rows:
    print(f"{r['checkpoint_label']:6s} ‖∇f‖₁ = {r['value']:.4f}, loss change after the step {r['descent']:+.2e}")
