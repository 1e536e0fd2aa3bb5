"""The HDF5 curve file: create, write rows as they finish, resume, read.

Layout (``format = "minima.curve/1"``)::

    /                      attrs: format, created, minima_version, torch_version, config (JSON),
                                  checkpoint_a, checkpoint_b, sha256_a, sha256_b, model, bn_policy,
                                  plus free-form JSON attrs (e.g. endpoint checks)
    /alpha                 (K,) float64
    /train/loss            (K,) float64   mean cross-entropy over finite samples (nats); NaN = not computed
    /train/accuracy        (K,) float64   fraction in [0, 1]
    /train/nonfinite       (K,) int64     samples whose loss was not finite; −1 = not computed
    /test/...              same as train
    /bn/negative_variance  (K,) int64     BatchNorm channels whose running variance was < 0 (policy
                                          ``interpolate`` only; 0 otherwise); −1 = not computed

A row counts as done when ``test/nonfinite`` is ≥ 0: it is written last, after the row's other values, and
the file is flushed after every row, so a killed sweep resumes at the first missing row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from minima import __version__
from minima.checkpoint import utc_now

CURVE_FORMAT = "minima.curve/1"
SPLITS = ("train", "test")
ROW_FIELDS = ("train/loss", "train/accuracy", "train/nonfinite", "test/loss", "test/accuracy",
              "test/nonfinite", "bn/negative_variance")
_INT_FIELDS = frozenset({"train/nonfinite", "test/nonfinite", "bn/negative_variance"})


class ResultsError(ValueError):
    """A results file that is missing, foreign, or made with other inputs/settings."""


@dataclass(frozen=True)
class Curve:
    """A curve file's contents as numpy arrays (rows not computed yet hold NaN / −1) plus attributes."""

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
        return json.loads(self.attrs.get("config", "{}"))

    @property
    def complete(self) -> bool:
        return bool((self.test_nonfinite >= 0).all())

    @property
    def name_a(self) -> str:
        return self.attrs.get("label_a") or Path(str(self.attrs.get("checkpoint_a", "A"))).stem

    @property
    def name_b(self) -> str:
        return self.attrs.get("label_b") or Path(str(self.attrs.get("checkpoint_b", "B"))).stem


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


def create_curve_file(path: str | os.PathLike[str], alphas: np.ndarray, attrs: dict[str, Any]) -> None:
    """Create a curve file with every row "not computed" (written to a temporary name, then renamed)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ResultsError(f"output directory {path.parent} does not exist; create it or choose another --out")
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        _write_header(f, CURVE_FORMAT)
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        f.create_dataset("alpha", data=np.asarray(alphas, dtype=np.float64))
        for name in ROW_FIELDS:
            if name in _INT_FIELDS:
                f.create_dataset(name, data=np.full(len(alphas), -1, dtype=np.int64))
            else:
                f.create_dataset(name, data=np.full(len(alphas), np.nan, dtype=np.float64))
    os.replace(tmp, path)


def _check_format(f: h5py.File, path: Path) -> None:
    fmt = f.attrs.get("format")
    if fmt != CURVE_FORMAT:
        raise ResultsError(f"{path} is an HDF5 file but not a minima curve file (format {fmt!r}, expected "
                           f"{CURVE_FORMAT!r}); choose another --out or remove it")


def _open(path: Path, mode: str) -> h5py.File:
    if not path.is_file():
        raise ResultsError(f"results file {path} does not exist")
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise ResultsError(f"{path} is not a readable HDF5 file ({exc}); it may be corrupt or another format") from exc


def pending_rows(path: str | os.PathLike[str], alphas: np.ndarray, expected: dict[str, str]) -> list[int]:
    """Indices of rows still to compute in an existing file, after checking it was made from the same
    α grid and the same ``expected`` attributes (checkpoint hashes, config JSON, policy ...)."""
    path = Path(path)
    with _open(path, "r") as f:
        _check_format(f, path)
        stored = f["alpha"][()]
        if stored.shape != np.shape(alphas) or not np.array_equal(stored, alphas):
            raise ResultsError(f"{path} was made for another α grid ({len(stored)} points from {stored.min():g} "
                               f"to {stored.max():g}); use --overwrite or another --out")
        diffs = [k for k, v in expected.items() if str(f.attrs.get(k)) != str(v)]
        if diffs:
            detail = "; ".join(f"{k}: file has {f.attrs.get(k)!r}, now {expected[k]!r}" for k in diffs)
            raise ResultsError(f"{path} was made from other checkpoints or settings ({detail}); use --overwrite "
                               "to recompute it or choose another --out")
        done = f["test/nonfinite"][()] >= 0
    return [i for i in range(len(alphas)) if not done[i]]


def write_row(path: str | os.PathLike[str], index: int, values: dict[str, float | int]) -> None:
    """Write one α row (keys of :data:`ROW_FIELDS`), ``test/nonfinite`` last, then flush to disk."""
    path = Path(path)
    with _open(path, "r+") as f:
        for name in ROW_FIELDS:
            if name != "test/nonfinite":
                f[name][index] = values[name]
        f["test/nonfinite"][index] = values["test/nonfinite"]
        f.flush()


def set_attrs(path: str | os.PathLike[str], attrs: dict[str, Any]) -> None:
    """Add or replace root attributes (non-string values stored as JSON)."""
    with _open(Path(path), "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)


def load_curve(path: str | os.PathLike[str]) -> Curve:
    """Read a curve file into a :class:`Curve` (works on partially computed files too)."""
    path = Path(path)
    with _open(path, "r") as f:
        _check_format(f, path)
        arrays = {name: f[name][()] for name in ("alpha", *ROW_FIELDS)}
        attrs = _read_attrs(f)
    return Curve(
        alpha=arrays["alpha"], train_loss=arrays["train/loss"], train_accuracy=arrays["train/accuracy"],
        train_nonfinite=arrays["train/nonfinite"], test_loss=arrays["test/loss"],
        test_accuracy=arrays["test/accuracy"], test_nonfinite=arrays["test/nonfinite"],
        negative_variance=arrays["bn/negative_variance"], attrs=attrs, path=str(path),
    )


# ------------------------------------------------------------------------------------------- sharpness
SHARPNESS_FORMAT = "minima.sharpness/1"


def ensure_sharpness_file(path: str | os.PathLike[str]) -> None:
    """Create a sharpness file, or accept an existing curve or sharpness file (results go under
    ``sharpness/``); refuse anything else."""
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise ResultsError(f"output directory {path.parent} does not exist; create it or choose another --out")
        with h5py.File(path, "w") as f:
            _write_header(f, SHARPNESS_FORMAT)
        return
    with _open(path, "r") as f:
        fmt = f.attrs.get("format")
    if fmt not in (CURVE_FORMAT, SHARPNESS_FORMAT):
        raise ResultsError(f"{path} is not a minima curve or sharpness file (format {fmt!r}); choose another --out")


def sharpness_done(path: str | os.PathLike[str], label: str, metric: str, settings_key: str) -> bool:
    """Whether ``sharpness/<label>/<metric>`` holds a finished result computed with ``settings_key``."""
    with _open(Path(path), "r") as f:
        node = f.get(f"sharpness/{label}/{metric}")
        return node is not None and node.attrs.get("settings_key") == settings_key


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


def load_sharpness(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every stored sharpness result as a dict (``checkpoint_label``, ``metric`` and its attributes/arrays)."""
    out: list[dict[str, Any]] = []
    with _open(Path(path), "r") as f:
        if f.attrs.get("format") not in (CURVE_FORMAT, SHARPNESS_FORMAT):
            raise ResultsError(f"{path} is not a minima curve or sharpness file")
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
