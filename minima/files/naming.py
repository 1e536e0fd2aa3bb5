"""Names of outputs: a readable label for a checkpoint, and the checks every ``--out`` passes."""

from __future__ import annotations

import os
import re
from pathlib import Path


def run_label(path: str | os.PathLike[str]) -> str:
    """A readable name for a checkpoint: its run directory for generic names (final.pt, last.pt, init.pt,
    epoch_XXXX.pt), else the file's stem."""
    path = Path(path)
    if path.stem in ("final", "last", "init") or re.fullmatch(r"epoch_\d+", path.stem):
        return path.resolve().parent.name
    return path.stem


def check_output(out: Path, what: str, suffix: str = ".h5") -> Path:
    """``out`` if it can be written as ``what`` (e.g. "an HDF5 grid file"): a name ending in ``suffix`` in an
    existing directory; else a ``ValueError`` saying how to fix ``--out``."""
    if out.suffix != suffix:
        raise ValueError(f"--out {out} should end in {suffix} ({what})")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist; create it or choose another --out")
    return out
