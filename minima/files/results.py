"""The HDF5 results files: grids of any shape (a curve is the one-axis case) and sharpness results.

Grid file (``format = "minima.grid/1"``)::

    /                      attrs: format, created, minima_version, torch_version, axes (JSON list of axis names),
                                  request (JSON: the resolved request), config (JSON: the effective settings),
                                  checkpoint paths and sha256, model, bn_policy, labels, directions' provenance,
                                  plus free-form attrs (e.g. endpoint checks)
    /coords/<axis>         (n_axis,) float64 — one dataset per axis, in the order of ``axes``
    /train/loss            grid-shaped float64   mean cross-entropy over finite samples (nats); NaN = not computed
    /train/accuracy        grid-shaped float64   fraction in [0, 1]; NaN = not computed
    /train/nonfinite       grid-shaped int64     samples whose loss was not finite; −1 = not computed
    /test/...              same as train
    /bn/negative_variance  grid-shaped int64     BatchNorm channels whose running variance was < 0 (policy
                                                 ``interpolate`` only; 0 otherwise); −1 = not computed

The grid's shape is the tuple of the axes' lengths; points are numbered in C order (the last axis fastest). A point
counts as done when ``test/nonfinite`` is ≥ 0: it is written last, after the point's other values, and the file
is flushed after every point, so a killed sweep resumes at the points still missing. A curve along θ(α) is the
grid with the single axis ``alpha``. Files of the earlier one-dimensional format ``minima.curve/1`` (``/alpha`` at
the root instead of ``/coords/alpha``) are read by the same functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from minima import __version__, utc_now
from minima.core.config import differences
from minima.data.splits import subset_chain

GRID_FORMAT = "minima.grid/1"
CURVE_FORMAT = "minima.curve/1"  # the one-dimensional format before grids; still read
SHARPNESS_FORMAT = "minima.sharpness/1"
RESULT_FORMATS = (GRID_FORMAT, CURVE_FORMAT, SHARPNESS_FORMAT)
SPLITS = ("train", "test")
#: The values each point of a grid file stores, as ``split/quantity`` dataset names.
POINT_FIELDS = ("train/loss", "train/accuracy", "train/nonfinite", "test/loss", "test/accuracy",
                "test/nonfinite", "bn/negative_variance")
INT_FIELDS = frozenset({"train/nonfinite", "test/nonfinite", "bn/negative_variance"})
NOT_COMPUTED_INT = -1  # the integer fields' "not computed" (floats use NaN)
DONE_FIELD = "test/nonfinite"  # written last for every point


class ResultsError(ValueError):
    """A results file that is missing, foreign, or made with other inputs/settings."""


@dataclass(frozen=True)
class Grid:
    """A grid file's contents: coordinates per axis, grid-shaped arrays per field (points not computed yet hold
    NaN / −1), and the root attributes."""

    axes: tuple[str, ...]
    coords: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's shape: one length per axis, in the order of :attr:`axes`."""
        return tuple(len(self.coords[a]) for a in self.axes)

    @property
    def done(self) -> np.ndarray:
        """Boolean array of the grid's shape: which points are computed."""
        return self.values[DONE_FIELD] >= 0

    @property
    def complete(self) -> bool:
        """Whether every point has been computed."""
        return bool(self.done.all())

    @property
    def config(self) -> dict[str, Any]:
        """The settings the file was computed with (its ``config`` attribute, parsed)."""
        return json.loads(self.attrs.get("config", "{}"))


@dataclass(frozen=True)
class Curve:
    """A one-axis grid as numpy arrays along α (points not computed yet hold NaN / −1) plus attributes."""

    alpha: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    train_nonfinite: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    test_nonfinite: np.ndarray
    negative_variance: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The settings the file was computed with (its ``config`` attribute, parsed)."""
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def complete(self) -> bool:
        """Whether every point has been computed."""
        return bool((self.test_nonfinite >= 0).all())

    @property
    def name_a(self) -> str:
        """A short name of the first endpoint: its label, else its checkpoint's file stem."""
        return self.attrs.get("label_a") or Path(str(self.attrs.get("checkpoint_a", "A"))).stem

    @property
    def name_b(self) -> str:
        """A short name of the second endpoint: its label, else its checkpoint's file stem."""
        return self.attrs.get("label_b") or Path(str(self.attrs.get("checkpoint_b", "B"))).stem


def curve_from_values(alpha: np.ndarray, values: Mapping[str, np.ndarray], attrs: dict[str, Any],
                      path: str | None = None) -> Curve:
    """A :class:`Curve` from one-dimensional arrays keyed by :data:`POINT_FIELDS`."""
    return Curve(
        alpha=np.asarray(alpha, dtype=np.float64), train_loss=values["train/loss"],
        train_accuracy=values["train/accuracy"], train_nonfinite=values["train/nonfinite"].astype(np.int64),
        test_loss=values["test/loss"], test_accuracy=values["test/accuracy"],
        test_nonfinite=values["test/nonfinite"].astype(np.int64),
        negative_variance=values["bn/negative_variance"].astype(np.int64), attrs=attrs, path=path,
    )


def grid_points(coords: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every point of the grid as a row of coordinates, in C order (the file's point numbering):
    an array of shape (number of points, number of axes)."""
    mesh = np.meshgrid(*[np.asarray(c, dtype=np.float64) for c in coords.values()], indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def _attr(value: Any) -> Any:
    """An HDF5 attribute value: scalars, strings and arrays as they are, anything else as JSON."""
    if isinstance(value, np.ndarray):
        return value
    return value if isinstance(value, str | int | float | bool | np.generic) else json.dumps(value)


def _read_attrs(node: h5py.HLObject) -> dict[str, Any]:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in node.attrs.items()}


def _write_header(f: h5py.File, fmt: str) -> None:
    f.attrs["format"] = fmt
    f.attrs["created"] = utc_now()
    f.attrs["minima_version"] = __version__
    f.attrs["torch_version"] = str(torch.__version__)


def create_grid_file(path: str | os.PathLike[str], coords: Mapping[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Create a grid file with every point "not computed" (written to a temporary name, then renamed).

    ``coords``: axis name → coordinates (in axis order); ``attrs``: root attributes (non-strings as JSON)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ResultsError(f"output directory {path.parent} does not exist; create it or choose another --out")
    if not coords:
        raise ResultsError("a grid needs at least one axis")
    shape = tuple(len(c) for c in coords.values())
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        _write_header(f, GRID_FORMAT)
        f.attrs["axes"] = json.dumps(list(coords))
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        for axis, values in coords.items():
            f.create_dataset(f"coords/{axis}", data=np.asarray(values, dtype=np.float64))
        for name in POINT_FIELDS:
            if name in INT_FIELDS:
                f.create_dataset(name, data=np.full(shape, NOT_COMPUTED_INT, dtype=np.int64))
            else:
                f.create_dataset(name, data=np.full(shape, np.nan, dtype=np.float64))
    os.replace(tmp, path)


def _open(path: Path, mode: str) -> h5py.File:
    if not path.is_file():
        raise ResultsError(f"results file {path} does not exist")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise ResultsError(f"{path} is not a readable HDF5 file ({exc}); it may be corrupt or another format") from exc


def _axes(f: h5py.File, path: Path) -> tuple[str, ...]:
    fmt = f.attrs.get("format")
    if fmt == GRID_FORMAT:
        return tuple(json.loads(f.attrs["axes"]))
    if fmt == CURVE_FORMAT:
        return ("alpha",)
    if fmt == SHARPNESS_FORMAT:
        raise ResultsError(f"{path} holds sharpness results, not a curve or grid: print its table with python -m "
                           f"minima.sharpness --show {path}, or read it with minima.files.results.load_sharpness")
    raise ResultsError(f"{path} is an HDF5 file but not a minima grid or curve file (format {fmt!r}, expected "
                       f"{GRID_FORMAT!r})")


def _coords(f: h5py.File, axes: tuple[str, ...]) -> dict[str, np.ndarray]:
    if f.attrs.get("format") == CURVE_FORMAT:
        return {"alpha": f["alpha"][()]}
    return {a: f[f"coords/{a}"][()] for a in axes}


def pending_points(path: str | os.PathLike[str], coords: Mapping[str, np.ndarray],
                   expected: dict[str, Any]) -> list[int]:
    """Point numbers still to compute in an existing file, after checking it was made on the same grid and with
    the same ``expected`` attributes (checkpoint hashes, BN policy, and ``config``: a dict compared field by
    field, every difference named)."""
    path = Path(path)
    with _open(path, "r") as f:
        axes = _axes(f, path)
        stored = _coords(f, axes)
        if list(stored) != list(coords) or any(
                stored[a].shape != np.shape(coords[a]) or not np.array_equal(stored[a], coords[a]) for a in coords):
            where = ", ".join(f"{a}: {len(c)} points from {c.min():g} to {c.max():g}" for a, c in stored.items())
            raise ResultsError(f"{path} was made for another grid ({where}); use --overwrite or another --out")
        problems = []
        for key, want in expected.items():
            have = f.attrs.get(key)
            if key == "config":  # compared on the keys asked for (files may record more, e.g. world_size) that the
                old = json.loads(have) if isinstance(have, str) else {}  # file knows (older files lack newer keys)
                now = {k: want[k] for k in want if k in old}
                if isinstance(old.get("data"), dict) and isinstance(now.get("data"), dict):
                    old["data"], now["data"] = _older_data_record(old["data"], now["data"])
                problems += differences({k: old[k] for k in now}, now)
            elif str(have) != str(want):
                problems.append(f"{key}: {have!r} → {want!r}")
        if problems:
            raise ResultsError(f"{path} was made from other checkpoints or settings (file → now: "
                               + "; ".join(problems) + "); use --overwrite to recompute it or choose another --out")
        done = f[DONE_FIELD][()].reshape(-1) >= 0
    return [i for i in range(len(done)) if not done[i]]


class GridWriter:
    """A grid file held open for writing points (``with GridWriter(path) as w: w.write(i, values)``): one open per
    study, every point still flushed to disk as soon as it is written."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None

    def __enter__(self) -> GridWriter:
        self._file = _open(self.path, "r+")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, index: int, values: Mapping[str, float | int]) -> None:
        """Write point number ``index`` (C order) — every key of :data:`POINT_FIELDS`, ``test/nonfinite`` last —
        then flush to disk."""
        f = self._file
        if f is None:
            raise RuntimeError("GridWriter.write outside its with-block")
        where = np.unravel_index(index, f[DONE_FIELD].shape)
        for name in POINT_FIELDS:
            if name != DONE_FIELD:
                f[name][where] = values[name]
        f[DONE_FIELD][where] = values[DONE_FIELD]
        f.flush()


def _older_data_record(old: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A data record of an older file and today's, made comparable: its one-subset-per-split record read as chains,
    and today's keys the file does not know (e.g. ``bn_subset``) left out."""
    old = dict(old)
    if isinstance(old.get("subset"), dict):
        old["subset"] = subset_chain(old["subset"])
    return old, {k: v for k, v in now.items() if k in old}


def write_point(path: str | os.PathLike[str], index: int, values: Mapping[str, float | int]) -> None:
    """Write one point into the grid file ``path`` (opened and closed for it; a study holds a :class:`GridWriter`)."""
    with GridWriter(path) as writer:
        writer.write(index, values)


def set_attrs(path: str | os.PathLike[str], attrs: dict[str, Any]) -> None:
    """Add or replace root attributes (non-string values stored as JSON)."""
    with _open(Path(path), "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Read a grid file (or a ``minima.curve/1`` file, as a one-axis grid); partially computed files too."""
    path = Path(path)
    with _open(path, "r") as f:
        axes = _axes(f, path)
        coords = _coords(f, axes)
        values = {name: f[name][()] for name in POINT_FIELDS}
        attrs = _read_attrs(f)
    return Grid(axes=axes, coords=coords, values=values, attrs=attrs, path=str(path))


def load_curve(path: str | os.PathLike[str]) -> Curve:
    """Read a one-axis grid file (or a ``minima.curve/1`` file) into a :class:`Curve`."""
    return grid_curve(load_grid(path))


def grid_curve(grid: Grid) -> Curve:
    """A one-axis grid (axis ``alpha`` of a line, ``t`` of a path, or any other) as a :class:`Curve`, its axis as the
    curve's α."""
    if len(grid.axes) != 1:
        raise ResultsError(f"{grid.path or 'the grid'} is a {len(grid.axes)}-axis grid ({', '.join(grid.axes)}), not "
                           "a curve; read it with minima.files.results.load_grid")
    return curve_from_values(grid.coords[grid.axes[0]], grid.values, grid.attrs, grid.path)


# ------------------------------------------------------------------------------------------- sharpness
# Sharpness file (``format = "minima.sharpness/1"``, or results added to a grid/curve file): one group
# ``sharpness/<checkpoint label>/<result name>`` per finished metric, its scalar values and parameters as attributes
# (``value``, ``metric_kind``, ``settings_key`` — the resume key —, checkpoint path and sha256, data, BN mode, dtype,
# the metric's parameters and costs) and its arrays as datasets (e.g. ``eigenvalues``).


def check_sharpness_output(path: str | os.PathLike[str]) -> bool:
    """Checks only, nothing written: whether ``path`` exists and is a curve, grid or sharpness file (results go
    under ``sharpness/``); a missing directory or a foreign file is refused."""
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise ResultsError(f"output directory {path.parent} does not exist; create it or choose another --out")
        return False
    with _open(path, "r") as f:
        fmt = f.attrs.get("format")
    if fmt not in RESULT_FORMATS:
        raise ResultsError(f"{path} is not a minima grid, curve or sharpness file (format {fmt!r}); choose another "
                           "--out")
    return True


def ensure_sharpness_file(path: str | os.PathLike[str]) -> None:
    """Create a sharpness file, or accept an existing curve or sharpness file (:func:`check_sharpness_output`)."""
    if not check_sharpness_output(path):
        with h5py.File(path, "w") as f:
            _write_header(f, SHARPNESS_FORMAT)


def sharpness_done(path: str | os.PathLike[str], label: str, metric: str, settings_key: str) -> bool:
    """Whether ``sharpness/<label>/<metric>`` holds a finished result computed with ``settings_key`` (False for a
    file not written yet)."""
    if not Path(path).exists():
        return False
    with _open(Path(path), "r") as f:
        node = f.get(f"sharpness/{label}/{metric}")
        return node is not None and node.attrs.get("settings_key") == settings_key


def sharpness_checkpoints(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """Per label of a sharpness file, the checkpoint (path, sha256) its results were measured on ({} for a file not
    written yet)."""
    if not Path(path).exists():
        return {}
    found: dict[str, tuple[str, str]] = {}
    with _open(Path(path), "r") as f:
        for label, group in f.get("sharpness", {}).items():
            for result in group.values():
                found[label] = (str(result.attrs.get("checkpoint", "")), str(result.attrs.get("sha256", "")))
                break
    return found


def write_sharpness(path: str | os.PathLike[str], label: str, metric: str, values: dict[str, Any]) -> None:
    """Store one metric's result (scalars as attributes, arrays as datasets) and flush."""
    with _open(Path(path), "r+") as f:
        name = f"sharpness/{label}/{metric}"
        if name in f:
            del f[name]
        group = f.require_group(name)
        for key, value in values.items():
            if isinstance(value, np.ndarray):
                group.create_dataset(key, data=value)
            elif value is not None:
                group.attrs[key] = _attr(value)
        f.flush()


def read_format(path: str | os.PathLike[str]) -> str | None:
    """The ``format`` attribute of an HDF5 file; None for a file that is not HDF5 or has none (checks only)."""
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError:
        return None
    return fmt.decode() if isinstance(fmt, bytes) else (str(fmt) if fmt is not None else None)


def load_sharpness(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every stored sharpness result as a dict (``checkpoint_label``, ``metric`` and its attributes/arrays)."""
    out: list[dict[str, Any]] = []
    with _open(Path(path), "r") as f:
        if f.attrs.get("format") not in RESULT_FORMATS:
            raise ResultsError(f"{path} is not a minima grid, curve or sharpness file")
        root = f.get("sharpness")
        if root is None:
            return out
        for label in root:
            for metric in root[label]:
                group = root[label][metric]
                row: dict[str, Any] = {"checkpoint_label": label, "metric": metric}
                row.update(_read_attrs(group))
                row.update({k: group[k][()] for k in group})
                out.append(row)
    return out
