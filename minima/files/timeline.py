"""The probe timeline of a training run (``probes.h5`` in its run directory, ``format = "minima.probes/1"``).

One group per probe (its name, e.g. ``hessian`` or ``preconditioned``) with one row per time it ran: datasets
``step`` (optimiser steps taken when it ran), ``epoch``, ``lr``, ``value`` (the headline number), ``threshold`` (the
stability threshold of the optimiser at that learning rate: 2/η, 2(1+β)/η, (2 + 2β₁)/((1 − β₁)η); NaN where none
applies), ``sam_threshold`` and ``grad_norm`` (a SAM run only: SAM's edge λ_SAM from the full-batch gradient norm on
the probe subset, :func:`minima.optim.sam.sam_edge`), ``seconds``, ``hvps`` (Hessian-vector products, for eigenvalue
probes), and ``eigenvalues`` (rows of the top-k, for eigenvalue probes). Root attributes describe the probes (image
subset, BatchNorm mode, loss, optimiser) and ``probes``: a JSON list of every probe the run has had — its name,
period (``every`` steps; ``every_epochs`` when asked for in epochs), ``added_at_step`` (0, or the step of the resume
that added it) and, when a resume changed or dropped it, ``changed_at_step`` / ``dropped_at_step``. A resumed run
first truncates every group to the rows at or before the step it resumes from, so an interrupted and an
uninterrupted run write the same timeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from minima import __version__, utc_now

FORMAT = "minima.probes/1"
#: The scalar fields of each probe record in ``probes.h5``.
SCALARS = ("step", "epoch", "lr", "value", "threshold", "sam_threshold", "grad_norm", "seconds", "hvps")


def create(path: str | os.PathLike[str], attrs: dict[str, Any]) -> None:
    """A new, empty timeline (an existing one is replaced)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["created"] = utc_now()
        f.attrs["minima_version"] = __version__
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, str | int | float) else json.dumps(value)


def append(path: str | os.PathLike[str], probe: str, row: dict[str, Any]) -> None:
    """Add one row to ``probe``'s group (created on first use); ``row`` holds :data:`SCALARS` and optionally
    ``eigenvalues`` (a fixed-length vector per probe)."""
    with h5py.File(path, "a") as f:
        group = f.require_group(probe)
        for key in (*SCALARS, "eigenvalues"):
            if key not in row:
                continue
            value = np.asarray(row[key], dtype=np.float64)
            if key not in group:
                group.create_dataset(key, shape=(0, *value.shape), maxshape=(None, *value.shape), dtype=np.float64)
            data = group[key]
            data.resize(data.shape[0] + 1, axis=0)
            data[-1] = value
        f.flush()


def truncate(path: str | os.PathLike[str], step: int) -> None:
    """Drop every row written after optimiser step ``step`` (a resume from there recomputes them)."""
    if not Path(path).exists():
        return
    with h5py.File(path, "a") as f:
        for name in f:
            group = f[name]
            keep = int(np.sum(group["step"][()] <= step))
            for key in group:
                group[key].resize(keep, axis=0)


def record_probes(path: str | os.PathLike[str], probes: list[dict[str, Any]], step: int) -> None:
    """Merge the probes a run (re)starts with at optimiser step ``step`` into the ``probes`` attribute: a new one is
    added with ``added_at_step = step``, one whose period changed records ``changed_at_step``, one no longer run
    ``dropped_at_step``; an unchanged one is kept as it was (a resume from the same step writes the same list)."""
    with h5py.File(path, "a") as f:
        have = {p["name"]: p for p in json.loads(f.attrs.get("probes", "[]"))}
        now = {p["name"]: p for p in probes}
        for name, entry in have.items():
            if name not in now:
                entry.setdefault("dropped_at_step", step)
        for name, probe in now.items():
            old = have.get(name)
            if old is None:
                have[name] = {**probe, "added_at_step": step}
                continue
            old.pop("dropped_at_step", None)
            if any(old.get(k) != v for k, v in probe.items()):
                have[name] = {**old, **probe, "changed_at_step": step}
        f.attrs["probes"] = json.dumps(list(have.values()))


def load(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{probe: {dataset: array}}`` of a timeline file, plus ``"_attrs"``: its root attributes."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path} is not a probe timeline (format {f.attrs.get('format')!r}, expected {FORMAT!r})")
        out: dict[str, Any] = {name: {k: f[name][k][()] for k in f[name]} for name in f}
        out["_attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return out
