"""
Alignment and REPAIR: is the barrier between two seeds a permutation artefact?
==============================================================================

Two networks trained from different seeds compute similar functions with their hidden units in different orders,
so the straight line between them crosses a barrier. Aligning the second network's units to the first's
(weight matching, Ainsworth et al. 2023) removes the part of the barrier that is only a relabelling; REPAIR
(Jordan et al. 2023) then rescales each unit along the line to the statistics interpolated between the endpoints.
What ``python -m minima.align A.pt B.pt`` and ``python -m minima.interpolate A.pt B_aligned.pt --repair`` do.
"""

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from minima import data
from minima.figures import plot_curves
from minima.files import results
from minima.geometry.barriers import barriers
from minima.studies.align import AlignRequest, align
from minima.studies.interpolate import SweepRequest, run
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=1024, n_test=512, image_shape=(3, 8, 8), noise=600.0, seed=0)
common = dict(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [128, 128]}, epochs=6, batch_size=32,
              lr=1e-3, progress=False)
a = train(TrainConfig(**common, init_seed=0, seed=0, out=str(work / "a")), dataset=ds)
b = train(TrainConfig(**common, init_seed=1, seed=1, out=str(work / "b")), dataset=ds)

# %%
# Weight matching: B's hidden units permuted to match A's. The aligned checkpoint computes B's function exactly.
aligned, matching = align(AlignRequest(checkpoint_a=str(a), checkpoint_b=str(b), method="weights",
                                       out=str(work / "b_aligned.pt")))

# %%
# Three lines from A: to B, to the aligned B, and to the aligned B with REPAIR.
lines = {}
for name, end, repair in (("naive", b, False), ("weight matching", aligned, False),
                          ("weight matching + REPAIR", aligned, True)):
    path = run(SweepRequest(checkpoint_a=str(a), checkpoint_b=str(end), alphas="0:1:11", repair=repair,
                            out=str(work / f"{name.replace(' ', '_').replace('+', 'plus')}.h5"), progress=False,
                            plot=False))
    lines[name] = results.load_curve(path)
    print(f"{name:26s} train-loss barrier {barriers(lines[name])['barrier_train_loss']:.3f}")

fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
plot_curves(list(lines.values()), ax=ax, labels=list(lines))
