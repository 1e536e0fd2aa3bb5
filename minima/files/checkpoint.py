"""The checkpoint format: atomic save, safe load, model rebuild, compatibility checks.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` can read (tensors, numbers,
strings, lists, dicts — never a pickled class)::

    {"format": "minima.checkpoint/2",
     "model": {"name": str, "kwargs": dict},  # a registry model, torchvision:NAME or package.module:factory
     "state_dict": {name: tensor},
     "meta": {"epoch", "step", "global_batch_size", "world_size", "seed", "train_config", "data",
              "metrics", "torch_version", "minima_version", "created"},
     # only in resumable checkpoints:
     "optimizer": ..., "scheduler": ..., "rng": ...}

Format /1 (before torchvision and import-path models) is read as well. Saving writes a temporary file in the
destination directory, flushes and fsyncs it, then ``os.replace`` puts it under the final name: a crash at any
moment leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minima import __version__, utc_now
from minima.models import ModelSpecError, build_model

FORMAT = "minima.checkpoint/2"
READABLE_FORMATS = ("minima.checkpoint/1", FORMAT)  # /2: model names may be torchvision:NAME or module:factory
FORMAT_PREFIX = "minima.checkpoint/"
CURVE_FORMAT = "minima.curve-checkpoint/1"  # a trained curve's bends (make_curve_checkpoint)
REQUIRED_META = ("epoch", "step", "global_batch_size", "world_size", "seed", "train_config", "data",
                 "metrics", "torch_version", "minima_version", "created")
_ZIP_MAGIC = b"PK\x03\x04"
# Training settings (``meta["train_config"]`` keys) that may change when a run is resumed: they do not change the
# computation's result, so the checkpoints of one run may differ in them.
RESUMABLE_CHANGES = frozenset({"device", "threads", "progress", "print_every", "eval_batch_size", "out",
                               "data_on_device",
                               # probes measure the run without changing it: one may be added on resume
                               "probe", "probe_every", "probe_subset", "probe_bn_mode", "probe_topk",
                               "probe_warm_start",
                               # sinks copy what the run records: one may be added or dropped on resume
                               "log"})


class CheckpointError(ValueError):
    """A file that cannot be used as a minima checkpoint (missing, foreign, corrupt, unsafe, too new)."""


class UnsafeCheckpointError(CheckpointError):
    """The file contains pickled Python objects, which could run code when loaded; it is refused."""


class IncompatibleCheckpointsError(ValueError):
    """Two checkpoints that cannot be compared or interpolated (different model or parameter layout)."""


def make_meta(
    *, epoch: int, step: int, global_batch_size: int, world_size: int, seed: int,
    train_config: dict[str, Any], data: dict[str, Any], metrics: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None, precision: dict[str, Any] | None = None,
    data_placement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` block with the version and creation fields filled in; ``model_info`` (optional): the model's
    input shape, class count and whether it is convolutional, as the trainer found them by one dry forward;
    ``precision`` (optional): the float32 math and autocast in effect (:func:`minima.core.precision.effective`);
    ``data_placement`` (optional): where the training data lived (:class:`minima.data.Placement`)."""
    meta = {
        "epoch": int(epoch), "step": int(step), "global_batch_size": int(global_batch_size),
        "world_size": int(world_size), "seed": int(seed), "train_config": dict(train_config),
        "data": dict(data), "metrics": dict(metrics or {}),
        "torch_version": str(torch.__version__), "minima_version": __version__, "created": utc_now(),
    }
    if model_info is not None:
        meta["model_info"] = dict(model_info)
    if precision is not None:
        meta["precision"] = dict(precision)
    if data_placement is not None:
        meta["data_placement"] = dict(data_placement)
    return meta


def make_checkpoint(
    model_name: str, model_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any], **resume_state: Any,
) -> dict[str, Any]:
    """Assemble a checkpoint dict. ``resume_state`` may hold ``optimizer``, ``scheduler``, ``rng`` and
    any other plain-typed entries needed to continue training. Tensors are detached and moved to CPU."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}; build it with minima.files.checkpoint.make_meta")
    ckpt = {
        "format": FORMAT,
        "model": {"name": model_name, "kwargs": dict(model_kwargs)},
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
        "meta": meta,
    }
    ckpt.update(resume_state)
    return ckpt


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not all filesystems/platforms allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temporary file in the same directory, flush, fsync,
    ``os.replace``). The previous file under ``path``, if any, survives any failure before the rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with ``torch.load(..., weights_only=True)``.

    Raises :class:`CheckpointError` (or its subclass :class:`UnsafeCheckpointError`) with a message that
    names the problem: missing file, not a checkpoint, truncated/corrupt, pickled objects, foreign dict,
    a curve checkpoint, or an unknown format version.
    """
    return validate_checkpoint(_load_file(path, map_location), str(path))


def load_curve_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a curve checkpoint (:func:`make_curve_checkpoint`); a network checkpoint, or any other
    file, is a :class:`CheckpointError` saying what it is."""
    obj = _load_file(path, map_location, expected="a curve.pt written by python -m minima.curve")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(fmt, str) and fmt in READABLE_FORMATS:
        raise CheckpointError(f"{path} is a network checkpoint ({fmt}), not a curve; train a curve between two "
                              "checkpoints with python -m minima.curve A.pt B.pt")
    if fmt != CURVE_FORMAT:
        raise CheckpointError(f"{path} is not a minima curve checkpoint (format {fmt!r}, expected {CURVE_FORMAT!r})")
    for key in ("model", "curve", "bends", "meta"):
        if key not in obj:
            raise CheckpointError(f"{path} lacks the {key!r} entry required by {CURVE_FORMAT}")
    return obj


def make_curve_checkpoint(model: dict[str, Any], curve: dict[str, Any], bends: list[dict[str, torch.Tensor]],
                          meta: dict[str, Any], **resume_state: Any) -> dict[str, Any]:
    """A curve between two checkpoints: ``model`` (the endpoints' ``{"name", "kwargs"}``), ``curve`` (``kind``,
    ``bends`` and the ``endpoints``: each ``{"path", "sha256"}``), the bends' state dicts (on CPU) and ``meta``
    (training settings, position, metrics); ``resume_state`` as for :func:`make_checkpoint`."""
    return {"format": CURVE_FORMAT, "model": dict(model), "curve": dict(curve),
            "bends": [{k: v.detach().to("cpu", copy=True) for k, v in b.items()} for b in bends], "meta": meta,
            **resume_state}


def check_inputs(paths: Iterable[str | os.PathLike[str] | None]) -> None:
    """Refuse a missing input checkpoint first (before any output path is checked: an output beside a missing input
    would otherwise be what the error names)."""
    for path in paths:
        if path is not None and not Path(path).is_file():
            raise CheckpointError(f"checkpoint {path} does not exist" if not Path(path).exists()
                                  else f"checkpoint {path} is not a file")


def _load_file(path: str | os.PathLike[str], map_location: str | torch.device,
               expected: str = "a .pt file written by minima.train") -> Any:
    """The object in a PyTorch file, read with ``weights_only=True``, or a :class:`CheckpointError` naming why not
    and what to pass instead (``expected``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"\x89HDF"):
        raise CheckpointError(f"{path} is an HDF5 result file, not a checkpoint; pass {expected}")
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(b"\x80"):  # zip archive, or legacy pickle
        what = "an empty file" if not head else ("a text file" if _is_text(head) else "not a PyTorch file")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what}; torch.save writes a zip archive); "
                              f"pass {expected}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise UnsafeCheckpointError(
                f"{path} contains pickled Python objects (not only tensors and plain values), which could "
                "run arbitrary code when loaded, so minima refuses it. Re-save it from a trusted session as "
                "a plain dict of tensors (minima.files.checkpoint.save_checkpoint does)."
            ) from exc
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, KeyError, IndexError, OSError, ValueError) as exc:
        if head.startswith(_ZIP_MAGIC):
            raise CheckpointError(
                f"{path} is a truncated or corrupt checkpoint (the archive is incomplete: {exc}); re-copy "
                "it, or resume from an earlier checkpoint"
            ) from exc
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.load failed: {exc!r})") from exc
    return obj


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def validate_checkpoint(obj: Any, where: str = "checkpoint") -> dict[str, Any]:
    """Check the structure of a loaded checkpoint dict; return it unchanged."""
    if not isinstance(obj, dict) or "format" not in obj:
        hint = ""
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = (" It looks like a bare state_dict: wrap it with minima.files.checkpoint.make_checkpoint "
                    "(model name, kwargs, state_dict, meta) and save_checkpoint.")
        raise CheckpointError(f"{where} is a PyTorch file but not a minima checkpoint (no 'format' key).{hint}")
    fmt = obj["format"]
    if fmt == CURVE_FORMAT:
        raise CheckpointError(f"{where} is a curve checkpoint ({CURVE_FORMAT}), not one network's weights; evaluate "
                              f"the curve with python -m minima.curve --evaluate {where}, or pass a network checkpoint")
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT_PREFIX):
        raise CheckpointError(f"{where} has format {fmt!r}; expected {FORMAT!r}")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(f"{where} has format {fmt!r}, which this minima {__version__} cannot read "
                              f"(it reads {list(READABLE_FORMATS)}); upgrade minima")
    for key in ("model", "state_dict", "meta"):
        if key not in obj:
            raise CheckpointError(f"{where} lacks the {key!r} entry required by {FORMAT}")
    if not isinstance(obj["model"], dict) or "name" not in obj["model"] or "kwargs" not in obj["model"]:
        raise CheckpointError(f"{where}: 'model' must be a dict with 'name' and 'kwargs'")
    return obj


def model_from_checkpoint(ckpt: dict[str, Any], trusted: Iterable[str] = ()) -> nn.Module:
    """Rebuild the model from the stored name and kwargs and load its weights (strictly).

    A model named by an import path (``package.module:factory``) is rebuilt only when its module is in ``trusted``
    or ``$MINIMA_TRUSTED_IMPORTS``: loading a checkpoint never imports a module the user did not allow
    (:class:`minima.models.UntrustedImportError`, a one-line error saying how to allow it)."""
    try:
        kwargs = dict(ckpt["model"]["kwargs"])
        model = build_model(ckpt["model"]["name"], kwargs.pop("num_classes", None), trusted=trusted, **kwargs)
    except ModelSpecError as exc:
        raise CheckpointError(f"cannot rebuild the checkpoint's model: {exc}") from exc
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
               trusted: Iterable[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, meta)`` from a checkpoint file; the model is in eval mode on ``map_location``."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = model_from_checkpoint(ckpt, trusted).to(map_location)
    return model.eval(), ckpt["meta"]


def check_compatible(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> None:
    """Raise :class:`IncompatibleCheckpointsError` listing every difference in model name/kwargs and in
    state_dict keys, shapes and dtypes between checkpoints ``a`` and ``b``."""
    problems: list[str] = []
    if a["model"]["name"] != b["model"]["name"]:
        problems.append(f"model: {name_a} is {a['model']['name']!r}, {name_b} is {b['model']['name']!r}")
    if a["model"]["kwargs"] != b["model"]["kwargs"]:
        problems.append(f"model kwargs: {name_a} {a['model']['kwargs']} vs {name_b} {b['model']['kwargs']}")
    problems += layout_differences(a["state_dict"], b["state_dict"], name_a, name_b)
    if problems:
        raise IncompatibleCheckpointsError(
            f"checkpoints {name_a} and {name_b} do not share one architecture:\n  - " + "\n  - ".join(problems)
        )


def check_same_normalisation(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> None:
    """Raise :class:`IncompatibleCheckpointsError` unless both checkpoints were trained with the same input
    normalisation (``meta["data"]`` mean/std): otherwise no single input pipeline evaluates a mixture of them."""
    norm_a = (a["meta"]["data"]["mean"], a["meta"]["data"]["std"])
    norm_b = (b["meta"]["data"]["mean"], b["meta"]["data"]["std"])
    if not np.allclose(norm_a, norm_b, rtol=0, atol=1e-12):
        raise IncompatibleCheckpointsError(
            f"{name_a} was trained with input normalisation mean/std {norm_a}, {name_b} with {norm_b}: no single "
            "input pipeline evaluates a mixture of them as both were trained; retrain on the same data")


def check_same_layout(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor], name_a: str = "A",
                      name_b: str = "B") -> None:
    """Raise :class:`IncompatibleCheckpointsError` unless two state dicts have the same keys, shapes and dtypes."""
    problems = layout_differences(sa, sb, name_a, name_b)
    if problems:
        raise IncompatibleCheckpointsError(
            f"{name_a} and {name_b} do not share one parameter layout:\n  - " + "\n  - ".join(problems))


def layout_differences(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor], name_a: str,
                       name_b: str) -> list[str]:
    """Every difference in keys, shapes and dtypes between two state dicts, one line each."""
    problems: list[str] = []
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a:
        problems.append(f"keys only in {name_a}: {only_a[:10]}{' …' if len(only_a) > 10 else ''}")
    if only_b:
        problems.append(f"keys only in {name_b}: {only_b[:10]}{' …' if len(only_b) > 10 else ''}")
    for key in sorted(set(sa) & set(sb)):
        ta, tb = sa[key], sb[key]
        if ta.shape != tb.shape:
            problems.append(f"{key}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        elif ta.dtype != tb.dtype:
            problems.append(f"{key}: dtype {ta.dtype} vs {tb.dtype}")
    return problems


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (identifies the exact checkpoint a result was computed from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
