"""``python -m minima.plot FILE.h5 [FILE2.h5 ...] [--out FIG.png]``: redraw figures from result files.

A sharpness file with eigenvalue densities (``--metrics density``) → the densities overlaid, one per checkpoint
(PyHessian style). One curve file → the Keskar-style parametric plot; several curve files → one panel overlaying
them (Li et al. 2018, Fig. 3 style: e.g. the filter-normalised curves of SB and LB), the legend naming each; a plane
(two-axis grid) → contours, filled contours and a 3-D view with its checkpoints and trajectory. Surface files of
loss-landscape (Li et al.'s code) are drawn the same way, and ``--to-loss-landscape OUT.h5`` writes a minima curve
or plane in their layout (:mod:`minima.files.landscape`). Reads files only (never recomputes, never imports a
model); the figures themselves are drawn by :mod:`minima.figures`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.figures import (
    save_curve_figure,
    save_curves_figure,
    save_density_figure,
    save_planes_figure,
    save_probes_figure,
    save_surface_figure,
)
from minima.files import landscape, timeline
from minima.files.results import SHARPNESS_FORMAT, grid_curve, load_sharpness, read_format
from minima.files.rundir import RunDir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.plot``: redraw figures from files; returns the exit status."""
    p = cfg.ArgumentParser(prog="python -m minima.plot",
                           description="Redraw figures from result files and training runs: nothing is computed.")
    p.add_argument("files", nargs="+", type=Path,
                   help="what to draw: grid files (.h5) of python -m minima.interpolate, minima.surface or "
                        "minima.curve (one curve, several curves overlaid, a plane, or several planes' contours "
                        "overlaid); loss-landscape's surface files; sharpness files (.h5) of python -m "
                        "minima.sharpness holding eigenvalue densities; or a training run's folder (its probes.h5 "
                        "timeline with the stability thresholds and the training loss)")
    p.add_argument("--out", type=Path, default=None,
                   help="output image, .png/.pdf/.svg (default: FILE.png beside a single file; for several curves "
                        "overlay.png beside the first)")
    p.add_argument("--to-loss-landscape", type=Path, default=None, metavar="OUT.h5",
                   help="also write the (one) grid in loss-landscape's surface-file layout (xcoordinates, "
                        "ycoordinates, train_loss, train_acc, …; accuracy in percent)")
    args = p.parse_args(argv)

    def work() -> None:
        draw(args.files, args.out)
        if args.to_loss_landscape is not None:
            if len(args.files) != 1:
                raise ValueError("--to-loss-landscape writes one grid; give one file")
            print(f"wrote {landscape.save(landscape.load_any(args.files[0]), args.to_loss_landscape)}")

    return run_command("minima.plot", work)


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a file ``torch.save`` wrote (a zip archive), by its first bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def draw(files: Sequence[Path], out: Path | None = None) -> Path:
    """The figure of one grid file, or the overlay of several curve files; returns its path."""
    if len(files) == 1 and Path(files[0]).is_dir():
        return _probes(Path(files[0]), out)
    for f in files:
        if _is_checkpoint(Path(f)):
            raise ValueError(f"{f} is a checkpoint, not a result file: minima.plot draws the .h5 files that "
                             "interpolate, surface, curve and sharpness write (a curve's: curve.h5 beside its "
                             "curve.pt), or a training run's folder")
    if any(read_format(f) == SHARPNESS_FORMAT for f in files):
        return _densities(files, out)
    grids = [landscape.load_any(f) for f in files]
    planes = [g for g in grids if len(g.axes) != 1]
    if len(grids) > 1 and planes and len(planes) == len(grids) and all(len(g.axes) == 2 for g in grids):
        out = save_planes_figure(grids, out or Path(files[0]).parent / "planes_overlay.png")
        print(f"wrote {out}")
        return out
    if len(grids) > 1 and planes:
        raise ValueError(f"{planes[0].path} is a {len(planes[0].axes)}-axis grid; curves overlay curves and planes "
                         "overlay planes — not both in one figure")
    if len(grids) == 1:
        g = grids[0]
        out = out or Path(g.path or "grid.h5").with_suffix(".png")
        if len(g.axes) == 1:
            save_curve_figure(grid_curve(g), out)
        else:
            save_surface_figure(g, out)
    else:
        curves = [grid_curve(g) for g in grids]
        out = save_curves_figure(curves, out or Path(files[0]).parent / "overlay.png")
    print(f"wrote {out}")
    return out


def _probes(run_dir: Path, out: Path | None) -> Path:
    """A training run directory's probe timeline (``probes.h5``) with its training loss (``metrics.jsonl``)."""
    path = run_dir / "probes.h5"
    if not path.is_file():
        below = sorted(p.parent for p in run_dir.rglob("probes.h5"))
        if below:  # a pipeline's folder: its runs are below it
            shown = ", ".join(str(p) for p in below[:4]) + (f" and {len(below) - 4} more" if len(below) > 4 else "")
            raise ValueError(f"{run_dir} is not a training run; it holds {len(below)} run(s) with a probe timeline: "
                             f"{shown}; draw one with python -m minima.plot {below[0]}")
        raise ValueError(f"{run_dir} holds no probes.h5: train with --probe (e.g. --probe hessian:50) to record one, "
                         "or give a result file")
    line = timeline.load(path)
    metrics = RunDir(run_dir).metrics()
    attrs = line["_attrs"]
    optimizer = attrs.get("optimizer", "?")
    if "sam_rho" in attrs:
        optimizer = f"SAM ρ = {float(attrs['sam_rho']):g} around {optimizer}"
    title = (f"{run_dir.name}: probes on {json.loads(attrs.get('subset', '{}')).get('n', '?')} training images, "
             f"BatchNorm {attrs.get('bn_mode', '?')}, loss {attrs.get('loss', '?')}, {optimizer}")
    out = save_probes_figure(line, metrics, out or run_dir / "probes.png", title)
    print(f"wrote {out}")
    return out


def _densities(files: Sequence[Path], out: Path | None) -> Path:
    """The Hessian eigenvalue densities stored in sharpness files, overlaid (e.g. SB and LB)."""
    found = [r for f in files for r in load_sharpness(f) if str(r["metric"]).startswith("density")]
    if not found:
        raise ValueError(f"{files[0]} holds sharpness results but no eigenvalue density to draw; print its table with "
                         f"python -m minima.sharpness --show {files[0]}, read it with "
                         "minima.files.results.load_sharpness, or measure a density with --metrics density")
    out = save_density_figure(found, out or Path(files[0]).with_name(Path(files[0]).stem + "_density.png"))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
