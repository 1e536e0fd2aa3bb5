"""``python -m minima.plot FILE.h5 [FILE2.h5 ...] [--out FIG.png]``: redraw figures from result files.

Reads curve files only (never recomputes, never imports a model) and writes each figure beside its file, or to
``--out`` for a single file. The figures themselves are drawn by :mod:`minima.plots`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from minima.plots import save_curve_figure
from minima.results import ResultsError, load_curve


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minima.plot", description="Redraw figures from .h5 curve files.")
    p.add_argument("files", nargs="+", type=Path, help="curve files (.h5) written by python -m minima.interpolate")
    p.add_argument("--out", type=Path, default=None,
                   help="output image, .png/.pdf/.svg (default: FILE.png beside each file; one input file only)")
    args = p.parse_args(argv)
    if args.out is not None and len(args.files) > 1:
        print("[minima.plot] error: --out takes one input file; drop --out to write FILE.png beside each",
              file=sys.stderr)
        return 2
    matplotlib.use("Agg")  # a command writes files; it never opens a window
    for f in args.files:
        try:
            curve = load_curve(f)
        except ResultsError as exc:
            print(f"[minima.plot] error: {exc}", file=sys.stderr)
            return 2
        out = save_curve_figure(curve, args.out or f.with_suffix(".png"))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
