"""``python -m minima.plot FILE.h5 [FILE2.h5 ...] [--out FIG.png]``: redraw figures from result files.

One curve file → the Keskar-style parametric plot; several curve files → one panel overlaying them (Li et al.
2018, Fig. 3 style: e.g. the filter-normalised curves of SB and LB), the legend naming each; a plane (two-axis grid)
→ contours, filled contours and a 3-D view with its checkpoints and trajectory. Reads files only (never
recomputes, never imports a model); the figures themselves are drawn by :mod:`minima.figures`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.figures import save_curve_figure, save_curves_figure, save_surface_figure
from minima.files.results import curve_from_values, load_grid


def main(argv: Sequence[str] | None = None) -> int:
    p = cfg.ArgumentParser(prog="python -m minima.plot", description="Redraw figures from .h5 result files.")
    p.add_argument("files", nargs="+", type=Path,
                   help="grid files (.h5) written by python -m minima.interpolate or python -m minima.surface")
    p.add_argument("--out", type=Path, default=None,
                   help="output image, .png/.pdf/.svg (default: FILE.png beside a single file; for several curves "
                        "overlay.png beside the first)")
    args = p.parse_args(argv)
    return run_command("minima.plot", lambda: draw(args.files, args.out))


def draw(files: Sequence[Path], out: Path | None = None) -> Path:
    """The figure of one grid file, or the overlay of several curve files; returns its path."""
    matplotlib.use("Agg")  # a command writes files; it never opens a window
    grids = [load_grid(f) for f in files]
    planes = [g for g in grids if len(g.axes) != 1]
    if len(grids) > 1 and planes:
        raise ValueError(f"{planes[0].path} is a {len(planes[0].axes)}-axis grid; only curves can be overlaid — plot "
                         "each plane on its own")
    if len(grids) == 1:
        g = grids[0]
        out = out or Path(g.path or "grid.h5").with_suffix(".png")
        if len(g.axes) == 1:
            save_curve_figure(curve_from_values(g.coords[g.axes[0]], g.values, g.attrs, g.path), out)
        else:
            save_surface_figure(g, out)
    else:
        curves = [curve_from_values(g.coords[g.axes[0]], g.values, g.attrs, g.path) for g in grids]
        out = save_curves_figure(curves, out or Path(files[0]).parent / "overlay.png")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
