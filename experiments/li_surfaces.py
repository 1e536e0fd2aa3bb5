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

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import keskar
from experiments._pipeline import Pipeline, copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core.allocator import keep_freed_memory
from minima.core.config import setting
from minima.figures import save_curves_figure
from minima.files import results
from minima.models import available_models
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.stages import Rates, Stage
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_curve
from minima.studies.surface import SurfaceRequest
from minima.studies.surface import run as run_surface

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LiSurfaces:
    """The surfaces' own settings (the top level of the preset; [surface] and [curve] are library requests)."""

    grid_points: int = setting(21, "points per axis of every plane")
    extent: float = setting(1.0, "random planes span [−extent, extent]², the curves α ∈ [−extent, extent] "
                            "(filter-normalised units)")
    curve_points: int = setting(41, "points of each 1-D curve")
    keskar_preset: str | None = setting(None, "the Keskar preset whose SB/LB checkpoints are drawn (its SB/LB "
                                        "training stages of seed 0 run here when its run directory lacks them)",
                                        default_text="this preset's name")


SPEC = Spec("li_surfaces", LiSurfaces, {
    # Li et al.: seeded filter-normalised random directions, none on biases and BatchNorm; BatchNorm re-estimated
    "surface": Section(SurfaceRequest, {"norm": "filter", "ignore": "bn-and-bias", "direction_seed": 0,
                                        "eval_batch_size": 1000, "progress": True, "yes": True},
                       frozenset({"checkpoints", "x", "y", "out", "resume"}),
                       "every plane (minima.surface)"),
    "curve": Section(SweepRequest, {"direction": "random", "direction_seed": 0, "eval_batch_size": 1000,
                                    "plot": False},
                     frozenset({"checkpoint_a", "checkpoint_b", "alphas", "out", "resume", "direction"}),
                     "the 1-D random-direction curves through SB and LB (minima.interpolate)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")


def _grid_complete(path: Path) -> bool:
    return path.exists() and results.load_grid(path).complete


def _curve_complete(path: Path) -> bool:
    return path.exists() and results.load_curve(path).complete


def stages(p: Declared, kp: Declared, model: str, kdir: Path, out: Path) -> list[Stage]:
    """Keskar's SB and LB training stages of seed 0 (when its run directory lacks them; group ``keskar``), the three
    planes and the two curves (group ``surfaces``)."""
    data = functools.cache(lambda: keskar.load_data(model, kp))
    trained = [dataclasses.replace(s, name=f"Keskar {kp.name} {s.name}", group="keskar")
               for s in keskar.training_stages(model, kp, 0, kdir / "seed0", data)]
    needs = tuple(s.name for s in trained)
    seed_dir = kdir / "seed0"
    ckpts = {"x0": seed_dir / "sb" / "init.pt", "sb": seed_dir / "sb" / "final.pt", "lb": seed_dir / "lb" / "final.pt"}
    e, n = p.own.extent, p.own.grid_points
    axis = f"{-e}:{e}:{n}"
    planes = {"sb_random": p.request("surface", checkpoints=[ckpts["sb"]], x=axis, y=axis, out=out / "sb_random.h5"),
              "lb_random": p.request("surface", checkpoints=[ckpts["lb"]], x=axis, y=axis, out=out / "lb_random.h5"),
              "x0_sb_lb": p.request("surface", checkpoints=[ckpts["x0"], ckpts["sb"], ckpts["lb"]], x=f"auto:{n}",
                                    y=f"auto:{n}", out=out / "x0_sb_lb.h5")}
    s, c = p.values("surface"), p.values("curve")

    def images(values: dict) -> int:
        ds = data()
        n_train = values.get("train_subset") or len(ds.train)
        return 2 * n_train + (values.get("test_subset") or len(ds.test))  # train + test + BatchNorm re-estimation

    found = list(trained)
    for name, req in planes.items():
        found.append(Stage(name, "surfaces", lambda q=req.out: _grid_complete(q),
                           lambda q=req: run_surface(dataclasses.replace(q, resume=q.out.exists())),
                           lambda r: r.grid(n * n, images(s)), needs))
    for regime in ("sb", "lb"):
        path = out / f"{regime}_random_curve.h5"
        req = p.request("curve", checkpoint_a=ckpts[regime], alphas=f"{-e}:{e}:{p.own.curve_points}", out=path)
        found.append(Stage(path.stem, "surfaces", lambda q=path: _curve_complete(q),
                           lambda q=req: run_curve(dataclasses.replace(q, resume=q.out.exists())),
                           lambda r: r.grid(p.own.curve_points, images(c)), needs))
    return found


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
    ap = PIPELINE.parser(__doc__)
    ap.add_argument("--model", default="mlp", choices=available_models(), help="network (default: mlp)")
    ap.add_argument("--keskar-out", type=Path, default=None,
                    help="the Keskar pipeline's run directory (default: runs/keskar_<model>_<keskar preset>)")
    ap.add_argument("--data", default=None, help="the data source of the Keskar training and of every point: the "
                    "same as surface.data=…, curve.data=… and Keskar's train.data=…")
    args = ap.parse_intermixed_args(argv)
    data_overrides = [f"{k}.data={args.data}" for k in ("surface", "curve")] if args.data else []
    try:
        li = PIPELINE.load(args.preset, list(args.overrides) + data_overrides)
        kname = li.own.keskar_preset or args.preset
        try:  # the nested preset too, before the first stage
            kp = keskar.load_preset(kname, [f"train.data={args.data}"] if args.data else [])
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"preset {li.name}: the Keskar preset {kname!r}: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.li_surfaces] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t0 = time.perf_counter()
    kdir = args.keskar_out or Path("runs") / f"keskar_{args.model}_{kp.name}"
    out = args.out or Path("runs") / f"li_surfaces_{args.model}_{li.name}"
    data = functools.cache(lambda: keskar.load_data(args.model, kp))
    try:
        runner = PIPELINE.execute(stages(li, kp, args.model, kdir, out), out, args,
                                  lambda: Rates.for_network(args.model, keskar.model_kwargs(args.model, kp),
                                                            data().num_classes, data().image_shape,
                                                            batch=min(kp.own.sb_batch, 256)), li.to_dict())
    except (ValueError, OSError, data_mod.DataError) as exc:
        print(f"[experiments.li_surfaces] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    curves = {regime: results.load_curve(out / f"{regime}_random_curve.h5") for regime in ("sb", "lb")}
    figures = [out / f"{k}.png" for k in ("sb_random", "lb_random", "x0_sb_lb")]
    figures.append(save_curves_figure([curves["sb"], curves["lb"]], out / "sb_lb_random_curves.png"))
    e, n, s = li.own.extent, li.own.grid_points, li.values("surface")
    half = round(e / 2, 6)
    rows = {k: {"basin_2x": _basin(out / f"{k}.h5")} for k in ("sb_random", "lb_random")}
    for regime in ("sb", "lb"):
        rows[f"{regime}_random"].update(rise_half=_rise(curves[regime], half), rise_full=_rise(curves[regime], e))
    wall = time.perf_counter() - t0
    md = "\n".join([
        f"# Li et al. (2018) surfaces of Keskar's SB and LB minima — `{args.model}`, preset `{li.name}`", "",
        f"Checkpoints: {kdir}/seed0 (SB, LB, shared x0). Planes {n}×{n}, random directions normalised "
        f"`{s['norm']}` (ignore `{s['ignore']}`), seeds {s['direction_seed']}/{s['direction_seed'] + 1}; "
        f"{s.get('train_subset') or 'all'} train / {s.get('test_subset') or 'all'} test images per point, BatchNorm "
        f"re-estimated at every point. This invocation {wall / 60:.1f} min.", "",
        "| minimum | share of the random plane with train loss ≤ 2× the minimum's | train-loss rise at "
        f"α = ±{half:g} | at α = ±{e:g} |",
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
