"""Names of outputs: a readable label for a checkpoint, and the checks every ``--out`` passes."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path


def natural_key(name: str) -> list[int | str]:
    """Sort key of names with numbers in them in the order a person expects: ``net.2`` before ``net.10``,
    ``epoch_0009`` before ``epoch_0010`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run_label(path: str | os.PathLike[str]) -> str:
    """A readable name for a checkpoint: its run directory for generic names (final.pt, last.pt, init.pt,
    epoch_XXXX.pt), else the file's stem."""
    path = Path(path)
    if _generic(path):
        return path.resolve().parent.name
    return path.stem


def unique_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """One label per checkpoint, distinct within the list — results are stored per label, so two checkpoints may never
    share one. Each starts as :func:`run_label`; one run's other checkpoints beside its ``final.pt`` add their stem
    (``RUN/init.pt`` → ``RUN-init``, ``RUN/final.pt`` → ``RUN``); labels that still collide take their directories
    above the run directory, joined by ``-``, one more at a time, until they differ (``lr0.1/seed0/final.pt`` and
    ``lr0.01/seed0/final.pt`` → ``lr0.1-seed0`` and ``lr0.01-seed0``). The same file named twice is refused: it would
    be measured twice."""
    resolved = [Path(p).resolve() for p in paths]
    seen: dict[Path, int] = {}
    for i, r in enumerate(resolved):
        if r in seen:
            raise ValueError(f"{paths[seen[r]]} and {paths[i]} are the same checkpoint; name each checkpoint once")
        seen[r] = i
    labels = [run_label(p) for p in paths]
    runs = [r.parent for r in resolved]
    for i, r in enumerate(resolved):  # one run's checkpoints: RUN (final.pt), RUN-init, RUN-last, RUN-epoch_0010
        if _generic(r) and r.stem != "final" and runs.count(runs[i]) > 1:
            labels[i] = f"{labels[i]}-{r.stem}"
    depth = [0] * len(labels)
    while True:
        clashes = {lab for lab in labels if labels.count(lab) > 1}
        if not clashes:
            return labels
        grew = False
        for i, lab in enumerate(labels):
            if lab not in clashes:
                continue
            base = resolved[i].parent if _generic(resolved[i]) else resolved[i].with_suffix("")
            parents = base.parents
            if depth[i] < len(parents) - 1:  # never the file system's root
                depth[i] += 1
                labels[i] = f"{parents[depth[i] - 1].name}-{labels[i]}"
                grew = True
        if not grew:  # cannot happen for distinct files, kept so the loop always ends
            raise ValueError("cannot give distinct labels to " + ", ".join(str(p) for p in paths))


def _generic(path: Path) -> bool:
    """Whether a checkpoint's file name says nothing (its run directory names it)."""
    return path.stem in ("final", "last", "init") or re.fullmatch(r"epoch_\d+", path.stem) is not None


def check_output(out: Path, what: str, suffix: str = ".h5") -> Path:
    """``out`` if it can be written as ``what`` (e.g. "an HDF5 grid file"): a name ending in ``suffix`` in an
    existing directory; else a ``ValueError`` saying how to fix ``--out``."""
    if out.suffix != suffix:
        raise ValueError(f"--out {out} should end in {suffix} ({what})")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist; create it or choose another --out")
    return out
