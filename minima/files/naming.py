"""Names of outputs: a readable label for a checkpoint, and where a command's output goes by default."""

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
