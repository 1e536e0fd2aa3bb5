"""
A line between two minima, and its barrier
==========================================

Two small MLPs trained from different seeds on the same data, the loss and accuracy along the straight line
θ(α) = (1 − α)·θ_A + α·θ_B between them, and the barrier: the largest rise of the loss above the straight
interpolation of the endpoints' values. This is what ``python -m minima.interpolate A.pt B.pt`` does, from Python.
"""

import tempfile
from pathlib import Path

from minima import data
from minima.figures import plot_curve
from minima.files import results
from minima.geometry.barriers import barriers, describe
from minima.studies.interpolate import SweepRequest, run
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))

# %%
# Train two networks
# ------------------
# ``TrainConfig`` is the request behind ``python -m minima.train``: every flag is a field, ``init_seed`` chooses the
# initial weights and ``seed`` the order of the batches. The data: a seeded synthetic problem, 10 classes of noisy
# 3×8×8 images (each class a random prototype plus Gaussian noise), small enough to train in seconds; the
# checkpoint records it, so every later command rebuilds exactly these images.
ds = data.synthetic(n_train=1024, n_test=512, image_shape=(3, 8, 8), noise=600.0, seed=0)
common = dict(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [64, 64]}, epochs=15, batch_size=32,
              lr=1e-3, progress=False)
a = train(TrainConfig(**common, init_seed=0, seed=0, out=str(work / "a")), dataset=ds)
b = train(TrainConfig(**common, init_seed=1, seed=1, out=str(work / "b")), dataset=ds)

# %%
# Evaluate the line
# -----------------
# 17 points with α in [−0.5, 1.5], on every training and test image. The file is written point by point (a
# stopped sweep resumes with ``resume=True``); its attributes record the checkpoints, data and settings.
path = run(SweepRequest(checkpoint_a=str(a), checkpoint_b=str(b), alphas="-0.5:1.5:17", out=str(work / "line.h5"),
                        progress=False, plot=False))
curve = results.load_curve(path)
print(describe(barriers(curve)))

# %%
# Draw it
# -------
# The same figure ``python -m minima.plot line.h5`` draws: the loss on a log axis (train solid, test dashed) and
# the accuracy, with the settings in the title. Both networks fit their 1,024 training images (the noisy classes are
# hard: about 30 % test accuracy) and still lower their training loss a little when moved outward (α < 0, α > 1):
# after 15 epochs of Adam neither sits at the bottom of its valley along this line. Between them the training loss
# rises by more than a nat — two seeds, two separate minima (whether the barrier is only a relabelling of hidden
# units is the question of the alignment example).
fig = plot_curve(curve)
