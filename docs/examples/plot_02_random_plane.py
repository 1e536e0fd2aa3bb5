"""
A random plane through a minimum
================================

Li et al. (NeurIPS 2018): the loss on the plane θ + x·δ + y·η through one checkpoint, δ and η random directions
normalised filter by filter (each row of a weight matrix, each convolution filter, scaled to the norm of the same
filter of θ; zero on biases and BatchNorm). What ``python -m minima.surface A.pt`` computes.
"""

import tempfile
from pathlib import Path

from minima import data
from minima.figures import plot_surface
from minima.files import results
from minima.studies.surface import SurfaceRequest, run
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=1024, n_test=512, image_shape=(3, 8, 8), noise=600.0, seed=0)
final = train(TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [64, 64]}, epochs=6,
                          batch_size=32, lr=1e-3, progress=False, out=str(work / "run")), dataset=ds)

# %%
# An 11 × 11 grid on [−1, 1]², every point on all 1,024 training and 512 test images. The directions are drawn
# from ``direction_seed`` and stored in the file, so the plane can be extended or redrawn later.
path = run(SurfaceRequest(checkpoints=[str(final)], x="-1:1:11", y="-1:1:11", out=str(work / "plane.h5"),
                          progress=False, plot=False, yes=True))
grid = results.load_grid(path)
print(f"{Path(grid.path).name}: axes {grid.axes}, training loss at the checkpoint "
      f"{grid.values['train/loss'][5, 5]:.4f}, lowest on the plane {grid.values['train/loss'].min():.4f}")

# %%
# Contours of the training loss (left), the test accuracy, and the surface in 3-D; the checkpoint is marked.
fig = plot_surface(grid)
