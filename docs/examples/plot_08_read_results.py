"""
Reading the result files with h5py and NumPy
============================================

Every result minima writes is a self-describing HDF5 file: a grid file (a line, a curve or a plane; format
``minima.grid/1``) stores one dataset per quantity over the grid's axes and its settings as attributes, and
sharpness results live under ``sharpness/<checkpoint>/<metric>``. ``minima.files.results`` reads them into
NumPy arrays; plain ``h5py`` reads them too, with no minima installed. A table library (pandas, polars) takes the
rows of :func:`~minima.files.results.load_sharpness` as they are.
"""

import json
import tempfile
from pathlib import Path

import h5py
import numpy as np

from minima import data
from minima.files import results
from minima.studies.interpolate import SweepRequest, run
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=512, n_test=256, image_shape=(3, 8, 8), noise=400.0, seed=0)
common = dict(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [32]}, epochs=8, batch_size=32,
              progress=False)
a = train(TrainConfig(**common, init_seed=0, out=str(work / "a")), dataset=ds)
b = train(TrainConfig(**common, init_seed=1, out=str(work / "b")), dataset=ds)
path = run(SweepRequest(checkpoint_a=str(a), checkpoint_b=str(b), alphas="-0.5:1.5:9", out=str(work / "line.h5"),
                        progress=False, plot=False))

# %%
# With h5py alone: the axis under ``coords/``, one dataset per split and quantity, the settings as attributes.
with h5py.File(path, "r") as f:
    print("format:", f.attrs["format"], "| axes:", json.loads(f.attrs["axes"]))
    print("groups:", sorted(f.keys()), "| training quantities:", sorted(f["train"].keys()))
    alpha = f["coords/alpha"][:]
    train_loss = f["train/loss"][:]
    data_spec = json.loads(f.attrs["config"])["data"]
print("α:", alpha)
print("training loss:", np.round(train_loss, 4))
print("data:", data_spec["source"]["kind"], data_spec["train_size"], "training images")

# %%
# With minima's reader: a Curve with named arrays, and the same numbers.
curve = results.load_curve(path)
assert np.array_equal(curve.train_loss, train_loss)
best = int(np.argmin(curve.test_loss))
print(f"lowest test loss {curve.test_loss[best]:.4f} at α = {curve.alpha[best]:g}")
