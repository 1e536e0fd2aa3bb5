"""Li et al. (2018) on Keskar's question: loss surfaces of the small-batch (SB) and large-batch (LB) minima.

    python -m experiments.li_surfaces --model mlp --preset quick        # ≈ 5 min on 2 CPU cores after keskar
    python -m experiments.li_surfaces --model c1 --preset paper         # GPU work

Takes the checkpoints of the Keskar pipeline (``experiments.keskar`` with the same model and preset, run first
when its run directory is not complete — each of its stages is skipped when done) and draws, from files:

* a plane through SB and one through LB along two seeded filter-normalised random directions (Li et al.'s
  Figure 5/6 style: log-level contours of the training loss, filled contours of the test accuracy, 3-D view);
* the plane through x0 (the shared initial weights), SB and LB: x0 at the origin, SB at (1, 0), coordinates in
  units of ‖SB − x0‖;
* 1-D filter-normalised random-direction curves through SB and through LB overlaid in one panel (Li et al.'s
  Figure 3 style).

BatchNorm statistics are re-estimated at every point (``recompute``). Writes every grid file and figure into the
run directory, a ``summary.md`` with the basin sizes, and copies the figures into ``--figures`` when given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments import keskar
from experiments._pipeline import StageClock, copy_figures, interruptible, write_summary
from minima.core import config as cfg
from minima.core.allocator import keep_freed_memory
from minima.core.config import setting
from minima.figures import save_curves_figure
from minima.files import results
from minima.geometry.directions import Ignore, Norm
from minima.models import available_models
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_curve
from minima.studies.surface import SurfaceRequest
from minima.studies.surface import run as run_surface

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs" / "pipelines"


@dataclass(frozen=True)
class LiPreset:
    """The surfaces' settings, with units (read from ``experiments/configs/pipelines/li_surfaces_<name>.toml``)."""

    grid_points: int = setting(21, "points per axis of every plane")
    extent: float = setting(1.0, "random planes span [−extent, extent]² (filter-normalised units)")
    curve_points: int = setting(41, "points of each 1-D curve, α ∈ [−extent, extent]")
    train_subset: int | None = setting(None, "stratified training subset per point", unit="samples",
                                       default_text="all")
    test_subset: int | None = setting(None, "stratified test subset per point", unit="samples", default_text="all")
    norm: Norm = setting("filter", "normalisation of the random directions")
    ignore: Ignore = setting("bn-and-bias", "random directions on biases and BatchNorm parameters")
    direction_seed: int = setting(0, "seed of the random directions")
    eval_batch_size: int = setting(1000, "evaluation batch size", unit="samples")


def _basin(path: Path, factor: float = 2.0) -> float:
    """Share of a plane's points whose training loss is within ``factor`` × the loss at the checkpoint (0, 0)."""
    grid = results.load_grid(path)
    loss = grid.values["train/loss"]
    i, j = int(np.argmin(np.abs(grid.coords["x"]))), int(np.argmin(np.abs(grid.coords["y"])))
    return float(np.mean(np.isfinite(loss) & (loss <= factor * loss[i, j])))


def _rise(curve: results.Curve, alpha: float) -> float:
    """Mean training-loss increase at ±α over α = 0 along a curve."""
    at = {float(a): float(v) for a, v in zip(curve.alpha, curve.train_loss, strict=True)}
    zero = at[min(at, key=abs)]
    return float(np.mean([at[min(at, key=lambda a, s=s: abs(a - s * alpha))] for s in (-1, 1)]) - zero)


@interruptible("li_surfaces")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.li_surfaces", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=available_models(), help="network (default: mlp)")
    p.add_argument("--preset", default="quick", help="quick, paper, smoke: the Keskar pipeline's preset of that name "
                   "and experiments/configs/pipelines/li_surfaces_<name>.toml (default: quick)")
    p.add_argument("--keskar-out", type=Path, default=None,
                   help="the Keskar pipeline's run directory (default: runs/keskar_<model>_<preset>)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/li_surfaces_<model>_<preset>)")
    p.add_argument("--figures", type=Path, default=None, help="also copy the figures into this directory")
    p.add_argument("--data", default=None, help="override the presets' data source")
    args = p.parse_args(argv)
    try:
        name, li = cfg.load_preset(LiPreset, CONFIGS, "li_surfaces_", args.preset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.li_surfaces] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t0 = time.perf_counter()
    kdir = args.keskar_out or Path("runs") / f"keskar_{args.model}_{name}"
    kargs = ["--model", args.model, "--preset", args.preset, "--out", str(kdir)]
    status = keskar.main(kargs + (["--data", args.data] if args.data else []))
    if status != 0:
        return status  # 2: refused (said); 75: interrupted (said; the same command continues)
    out = args.out or Path("runs") / f"li_surfaces_{args.model}_{name}"
    out.mkdir(parents=True, exist_ok=True)
    seed_dir = kdir / "seed0"
    ckpts = {"x0": seed_dir / "sb" / "init.pt", "sb": seed_dir / "sb" / "final.pt", "lb": seed_dir / "lb" / "final.pt"}
    common: dict[str, Any] = {"data": args.data, "train_subset": li.train_subset, "test_subset": li.test_subset,
                              "eval_batch_size": li.eval_batch_size, "progress": True, "yes": True}
    axis = f"{-li.extent}:{li.extent}:{li.grid_points}"
    planes = {
        "sb_random": SurfaceRequest(checkpoints=[ckpts["sb"]], x=axis, y=axis, norm=li.norm, ignore=li.ignore,
                                    direction_seed=li.direction_seed, out=out / "sb_random.h5", **common),
        "lb_random": SurfaceRequest(checkpoints=[ckpts["lb"]], x=axis, y=axis, norm=li.norm, ignore=li.ignore,
                                    direction_seed=li.direction_seed, out=out / "lb_random.h5", **common),
        "x0_sb_lb": SurfaceRequest(checkpoints=[ckpts["x0"], ckpts["sb"], ckpts["lb"]], out=out / "x0_sb_lb.h5",
                                   x=f"auto:{li.grid_points}", y=f"auto:{li.grid_points}", **common),
    }
    stages = StageClock("li_surfaces", len(planes) + 2)  # the planes, then the SB and LB curves
    for req in planes.values():
        stages.run(req.out.stem, req.out.exists() and results.load_grid(req.out).complete, lambda r=req: run_surface(
            cfg.resolve(SurfaceRequest, None, {**cfg.to_dict(r), "resume": r.out.exists()})))
    curves = {}
    for regime in ("sb", "lb"):
        path = out / f"{regime}_random_curve.h5"
        stages.run(path.stem, path.exists() and results.load_curve(path).complete, lambda q=path, r=regime: run_curve(
            SweepRequest(checkpoint_a=ckpts[r], direction="random", direction_seed=li.direction_seed,
                         alphas=f"{-li.extent}:{li.extent}:{li.curve_points}", data=args.data,
                         train_subset=li.train_subset, test_subset=li.test_subset, out=q, resume=q.exists(),
                         eval_batch_size=li.eval_batch_size, plot=False)))
        curves[regime] = results.load_curve(path)
    figures = [out / f"{k}.png" for k in planes]
    figures.append(save_curves_figure([curves["sb"], curves["lb"]], out / "sb_lb_random_curves.png"))
    half = round(li.extent / 2, 6)
    rows = {k: {"basin_2x": _basin(out / f"{k}.h5")} for k in ("sb_random", "lb_random")}
    for regime in ("sb", "lb"):
        rows[f"{regime}_random"].update(rise_half=_rise(curves[regime], half),
                                        rise_full=_rise(curves[regime], li.extent))
    wall = time.perf_counter() - t0
    md = "\n".join([
        f"# Li et al. (2018) surfaces of Keskar's SB and LB minima — `{args.model}`, preset `{name}`", "",
        f"Checkpoints: {kdir}/seed0 (SB, LB, shared x0). Planes {li.grid_points}×{li.grid_points}, random "
        f"directions normalised `{li.norm}` (ignore `{li.ignore}`), seeds {li.direction_seed}/{li.direction_seed + 1};"
        f" {li.train_subset or 'all'} train / {li.test_subset or 'all'} test images per point, BatchNorm re-estimated "
        f"at every point. This invocation {wall / 60:.1f} min.", "",
        "| minimum | share of the random plane with train loss ≤ 2× the minimum's | train-loss rise at "
        f"α = ±{half:g} | at α = ±{li.extent:g} |",
        "|---|---|---|---|",
        *(f"| {k.split('_')[0].upper()} | {v['basin_2x']:.3f} | {v['rise_half']:.4g} | {v['rise_full']:.4g} |"
          for k, v in rows.items()), "",
    ])
    write_summary(out, md, rows)
    figures = copy_figures(figures, args.figures, [f"li_{args.model}_{f.name}" for f in figures])
    print(md)
    print(f"[experiments.li_surfaces] wrote {out / 'summary.md'} and {', '.join(map(str, figures))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
