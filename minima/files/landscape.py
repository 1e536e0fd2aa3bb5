"""Surface files of loss-landscape (Li et al. 2018, github.com/tomgoldstein/loss-landscape), read and written.

Their layout: datasets ``xcoordinates`` (and ``ycoordinates`` for a plane), ``train_loss``, ``train_acc`` and, where
computed, ``test_loss``, ``test_acc``; accuracy in percent; −1 marks a point not computed. Their surface array is
declared (len(x), len(y)) but filled in the order of ``np.meshgrid(x, y)`` raveled, so its flat index k is the point
(x[k mod nx], y[k div nx]): read as a (ny, nx) array it is indexed [y, x]. minima's grid arrays are indexed [x, y]
(axis order ``x``, ``y``, C order); :func:`load` and :func:`save` convert between the two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from minima.files.results import INT_FIELDS, NOT_COMPUTED_INT, Grid, ResultsError, load_grid

FIELDS = {"train/loss": "train_loss", "train/accuracy": "train_acc", "test/loss": "test_loss",
          "test/accuracy": "test_acc"}


def is_loss_landscape(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an HDF5 file in loss-landscape's layout (no minima ``format``, an ``xcoordinates``)."""
    try:
        with h5py.File(path, "r") as f:
            return "format" not in f.attrs and "xcoordinates" in f
    except OSError:
        return False


def load(path: str | os.PathLike[str]) -> Grid:
    """A loss-landscape surface (or 1-D) file as a :class:`Grid` with axes ``x`` (, ``y``), accuracy in [0, 1],
    points not computed as NaN; what it records about its run (``dir_file``) kept in ``directions``."""
    with h5py.File(path, "r") as f:
        x = np.asarray(f["xcoordinates"][()], dtype=np.float64)
        y = np.asarray(f["ycoordinates"][()], dtype=np.float64) if "ycoordinates" in f else None
        shape = (len(x),) if y is None else (len(x), len(y))
        values: dict[str, np.ndarray] = {}
        for ours, theirs in FIELDS.items():
            if theirs not in f:
                values[ours] = np.full(shape, np.nan)
                continue
            raw = np.asarray(f[theirs][()], dtype=np.float64).reshape(-1)
            grid = raw.reshape(shape) if y is None else raw.reshape(len(y), len(x)).T  # [y, x] → [x, y]
            grid = np.where(grid < 0, np.nan, grid)  # −1: not computed
            values[ours] = grid / 100.0 if ours.endswith("accuracy") else grid
        dir_file = f["dir_file"][()] if "dir_file" in f else b""
    done = np.isfinite(values["train/loss"]) | np.isfinite(values["test/loss"])
    for name in INT_FIELDS:  # loss-landscape counts no non-finite samples: 0 where a point was computed
        values[name] = np.where(done, 0, NOT_COMPUTED_INT).astype(np.int64)
    axes = ("x",) if y is None else ("x", "y")
    coords = {"x": x} if y is None else {"x": x, "y": y}
    source = dir_file.decode() if isinstance(dir_file, bytes) else str(dir_file)
    attrs = {"bn_policy": "as loss-landscape evaluated it", "marks": json.dumps({"origin": [0.0, 0.0]}),
             "directions": json.dumps({"kind": "loss-landscape", "dir_file": source})}
    return Grid(axes=axes, coords=coords, values=values, attrs=attrs, path=str(path))


def save(grid: Grid, path: str | os.PathLike[str]) -> Path:
    """A minima grid of one axis or a plane (axes ``x``, ``y``) written in loss-landscape's layout (accuracy in
    percent, −1 where not computed), so loss-landscape's own plotting scripts read it."""
    if len(grid.axes) not in (1, 2):
        raise ResultsError(f"only curves and planes can be written for loss-landscape; this grid has axes {grid.axes}")
    path = Path(path)
    with h5py.File(path, "w") as f:
        f["xcoordinates"] = np.asarray(grid.coords[grid.axes[0]], dtype=np.float64)
        if len(grid.axes) == 2:
            f["ycoordinates"] = np.asarray(grid.coords[grid.axes[1]], dtype=np.float64)
        f["dir_file"] = f"minima grid {grid.path or ''} ({grid.attrs.get('directions', '{}')})"
        for ours, theirs in FIELDS.items():
            values = np.asarray(grid.values[ours], dtype=np.float64) * (100.0 if ours.endswith("accuracy") else 1.0)
            values = np.where(np.isfinite(values), values, -1.0)
            # their flat order is meshgrid(x, y): [y, x] raveled, stored under the shape (nx, ny)
            f[theirs] = values if len(grid.axes) == 1 else values.T.reshape(-1).reshape(values.shape)
    return path


def load_any(path: str | os.PathLike[str]) -> Grid:
    """A minima grid or curve file, or a loss-landscape surface file."""
    return load(path) if is_loss_landscape(path) else load_grid(path)



def load_directions(path: str | os.PathLike[str], state: dict, parameter_names: list[str]) -> tuple[dict, dict, str]:
    """The two directions of a loss-landscape direction file (groups ``xdirection`` and ``ydirection``, one dataset
    ``"0"``, ``"1"``, … per tensor) as state dicts of the model whose ``state`` and ``parameter_names`` (in
    ``named_parameters()`` order) are given: one tensor per parameter is their ``--dir_type weights`` (in
    ``net.parameters()`` order), one per state-dict entry their ``--dir_type states``. Returns (d1, d2, dir_type);
    a file of another architecture is one error naming the first tensor that does not fit."""
    import torch

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ResultsError(f"{path} is not a readable HDF5 file ({exc})") from exc
    with f:
        if "xdirection" not in f or "ydirection" not in f:
            raise ResultsError(f"{path} is not a loss-landscape direction file (it needs the groups xdirection and "
                               "ydirection, as net_plotter.setup_direction writes them)")
        count = len(f["xdirection"])
        if count == len(parameter_names):
            keys, kind = parameter_names, "weights"
        elif count == len(state):
            keys, kind = list(state), "states"
        else:
            raise ResultsError(f"{path} holds {count} tensors per direction; this model has {len(parameter_names)} "
                               f"parameters and {len(state)} state-dict entries — it was made for another "
                               "architecture")
        directions = []
        for axis in ("xdirection", "ydirection"):
            d = {}
            for i, key in enumerate(keys):
                array = np.asarray(f[axis][str(i)][()])
                if tuple(array.shape) != tuple(state[key].shape):
                    raise ResultsError(f"{path}: {axis}/{i} has shape {array.shape} but {key} is "
                                       f"{tuple(state[key].shape)}; the file was made for another architecture")
                d[key] = torch.as_tensor(array, dtype=state[key].dtype) if state[key].is_floating_point() else None
            directions.append({k: v for k, v in d.items() if v is not None})
    return directions[0], directions[1], kind
