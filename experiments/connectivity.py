"""Is the barrier between two minima real? Permutation alignment, REPAIR and trained curves, end to end.

    python -m experiments.connectivity --preset quick     # ≈ 10 min on 2 CPU cores (+ the Keskar quick training
                                                          #   when runs/keskar_mlp_quick has not been run)
    python -m experiments.connectivity --preset paper     # GPU work: VGG11 (no BN) seeds, C1 SB/LB

Two questions, one run directory:

1. **Two networks from different seeds** (the setting of Entezari et al. 2022, Ainsworth et al. 2023, Jordan et al.
   2023): the straight line between them, after weight matching, after activation matching, each with and without
   REPAIR; the midpoint test accuracy and the barriers, beside REPAIR's published CIFAR-10 MLP numbers.
2. **Keskar's SB and LB minima** (the Keskar pipeline's checkpoints, trained first when its run directory lacks
   them): the straight line, the line to the weight-matched LB, and a Bézier curve trained between SB and the
   aligned LB (``python -m minima.curve --align``).

Every stage is skipped when its output is complete and resumed when partial. Writes ``summary.md``,
``summary.json`` and ``connectivity.png`` into the run directory (and the figure into ``--figures`` when given).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from experiments import keskar
from experiments._pipeline import (
    Pipeline,
    accuracy_difference,
    copy_figures,
    interruptible,
    within_noise,
    write_summary,
)
from minima import data as data_mod
from minima.core.allocator import cpu_name, keep_freed_memory
from minima.core.config import setting
from minima.figures import readable_log_axis
from minima.files import results
from minima.geometry.barriers import barriers
from minima.pipelines.curve import run as run_curve
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.stages import Rates, Stage
from minima.studies.align import AlignRequest, align
from minima.studies.curve import CurveRequest
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_line
from minima.studies.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
# Jordan et al. (ICLR 2023), REPAIR, CIFAR-10 MLP (11 hidden layers × 512): test accuracy (%) of the endpoints and of
# the midpoint of the line without alignment, after permutation (alignment) and after REPAIR.
REPAIR_MLP = {"endpoints": 57.31, "naive": 10.23, "permuted": 35.01, "repair": 52.91}


@dataclass(frozen=True)
class Connectivity:
    """The pipeline's own settings (the top level of its preset; the tables are library requests)."""

    keskar_model: str = setting("mlp", "network of the Keskar pipeline whose SB/LB checkpoints are used")
    keskar_preset: str = setting("quick", "that pipeline's preset (its SB/LB training stages of seed 0 run here "
                                 "when its run directory lacks them)")


SPEC = Spec("connectivity", Connectivity, {
    "pair": Section(TrainConfig, {"model": "mlp", "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
                                  "weight_decay": 0.0, "batch_size": 256, "epochs": 10, "augment": False,
                                  "eval_batch_size": 1000},
                    frozenset({"seed", "init_seed", "out"}), "the two seeds (minima.train; seeds 0, 1)"),
    "align": Section(AlignRequest, {"samples": None, "eval_batch_size": 1000},
                     frozenset({"checkpoint_a", "checkpoint_b", "method", "out"}),
                     "aligning seed 1 to seed 0 (minima.align; weights, then activations)"),
    "line": Section(SweepRequest, {"alphas": "0:1:11", "train_subset": 5000, "test_subset": 5000,
                                   "eval_batch_size": 1000, "plot": False},
                    frozenset({"checkpoint_a", "checkpoint_b", "repair", "out", "resume"}),
                    "every line between the seeds (minima.interpolate; ± REPAIR)"),
    # Garipov et al.'s quadratic Bézier curve, trained between SB and the weight-matched LB
    "curve": Section(CurveRequest, {"align": True, "bends": 1, "epochs": 10, "batch_size": 128, "lr": 0.015,
                                    "weight_decay": 5e-4, "t": "0:1:11", "train_subset": 10000, "test_subset": 5000,
                                    "eval_batch_size": 1000},
                     frozenset({"checkpoint_a", "checkpoint_b", "out", "resume"}),
                     "the SB–LB curve and its lines (minima.curve)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")


VARIANTS = (("naive", None, False), ("naive + REPAIR", None, True), ("weight matching", "weights", False),
            ("weight matching + REPAIR", "weights", True), ("activation matching", "activations", False),
            ("activation matching + REPAIR", "activations", True))


def _complete(path: Path) -> bool:
    return path.exists() and results.load_grid(path).complete


def _row(path: Path) -> dict[str, Any]:
    curve = results.load_curve(path)
    found = barriers(curve)
    mid = int(np.argmin(np.abs(curve.alpha - 0.5)))
    test_images = json.loads(curve.attrs.get("config", "{}")).get("data", {}).get("test_size")
    return {"endpoint_test_acc": [100 * float(curve.test_accuracy[0]), 100 * float(curve.test_accuracy[-1])],
            "test_images": test_images,
            "midpoint_test_acc": 100 * float(curve.test_accuracy[mid]), "midpoint": float(curve.alpha[mid]),
            "min_test_acc": 100 * float(np.min(curve.test_accuracy)), **found}


def _complete(path: Path) -> bool:
    return path.exists() and results.load_grid(path).complete


def pair_stages(p: Declared, out: Path) -> list[Stage]:
    """Train the two seeds, align seed 1 to seed 0 both ways, evaluate every line (group ``pair``)."""
    folder = out / "pair"
    nets = [folder / f"seed{seed}" / "final.pt" for seed in (0, 1)]
    found = []
    for seed, final in enumerate(nets):
        config = p.request("pair", seed=seed, init_seed=100 + seed, out=str(final.parent))
        found.append(Stage(f"train seed {seed}", "pair", final.exists,
                           lambda c=config, d=final.parent: train(c, resume=(d / "last.pt").exists()),
                           lambda r, c=config: _train_seconds(r, c)))
    trained = tuple(s.name for s in found)
    aligned = {None: nets[1]}
    for method in ("weights", "activations"):
        path = folder / f"seed1_{method}_aligned.pt"
        request = p.request("align", checkpoint_a=nets[0], checkpoint_b=nets[1], method=method, out=path)
        found.append(Stage(f"align seed 1 to seed 0 ({method})", "pair", path.exists,
                           lambda q=request: align(q), None, trained))
        aligned[method] = path
    for name, method, repair in VARIANTS:
        path = folder / f"line_{method or 'naive'}{'_repair' if repair else ''}.h5"
        request = p.request("line", checkpoint_a=nets[0], checkpoint_b=aligned[method], repair=repair, out=path,
                            resume=path.exists())
        needs = trained + ((f"align seed 1 to seed 0 ({method})",) if method else ())
        found.append(Stage(f"line: {name}", "pair", lambda q=path: _complete(q),
                           lambda q=request: run_line(dataclasses.replace(q, resume=q.out.exists())),
                           lambda r, q=request: _grid_seconds(r, q.alphas, q.train_subset, q.test_subset), needs))
    return found


def pair_files(out: Path) -> dict[str, Path]:
    return {name: out / "pair" / f"line_{method or 'naive'}{'_repair' if repair else ''}.h5"
            for name, method, repair in VARIANTS}


def sb_lb_files(p: Declared, out: Path) -> dict[str, Path]:
    folder = out / "sb_lb_curve"
    bends = p.values("curve")["bends"]
    return {"straight line SB → LB": folder / "line_unaligned.h5", "line SB → weight-matched LB": folder / "line.h5",
            f"Bézier curve SB → weight-matched LB ({bends} bend)": folder / "curve.h5"}


def sb_lb_stages(p: Declared, out: Path, kdir: Path) -> list[Stage]:
    """Keskar's SB and LB training stages of seed 0 (when its run directory lacks them), then the curve stage:
    align LB to SB, train the curve, evaluate it and both lines (group ``sb_lb``)."""
    kp = keskar.load_preset(p.own.keskar_preset)
    data = functools.cache(lambda: keskar.load_data(p.own.keskar_model, kp))
    trained = [dataclasses.replace(s, name=f"Keskar {kp.name} {s.name}", group="sb_lb")
               for s in keskar.training_stages(p.own.keskar_model, kp, 0, kdir / "seed0", data)]
    sb, lb = kdir / "seed0" / "sb" / "final.pt", kdir / "seed0" / "lb" / "final.pt"
    folder = out / "sb_lb_curve"
    request = p.request("curve", checkpoint_a=sb, checkpoint_b=lb, out=folder)
    files = sb_lb_files(p, out)
    curve = Stage("SB–LB: align, train the curve, evaluate the curve and both lines", "sb_lb",
                  lambda: all(_complete(f) for f in files.values()),
                  lambda: run_curve(dataclasses.replace(request, resume=folder.exists())),
                  lambda r: _curve_seconds(r, request), tuple(s.name for s in trained))
    return [*trained, curve]


def _train_seconds(r: Rates, c: TrainConfig) -> float:
    n_train = c.train_subset or 50_000
    return r.training(c.epochs, n_train, c.test_subset or 10_000)


def _grid_seconds(r: Rates, alphas: str, train_subset: int | None, test_subset: int | None) -> float:
    points = int(alphas.split(":")[2]) if alphas.count(":") == 2 else len(alphas.split(","))
    return r.grid(points, (train_subset or 50_000) + (test_subset or 10_000))


def _curve_seconds(r: Rates, q: CurveRequest) -> float:
    n = q.train_subset or 50_000
    # training: one curve point per step (forward and backward through θ(t)); three paths evaluated on its grid
    return r.training(q.epochs, n, 0) + 3 * _grid_seconds(r, q.t, 2 * n, q.test_subset)


def figure(pair: dict[str, dict[str, Any]], sblb: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Left: test accuracy along the seed pair's lines; right: training loss along the SB–LB paths."""
    fig = Figure(figsize=(12.0, 5.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for k, (name, row) in enumerate(pair.items()):
        curve = results.load_curve(row["file"])
        left.plot(curve.alpha, 100 * curve.test_accuracy, color=f"C{k // 2}", ls="--" if "REPAIR" in name else "-",
                  marker="o", ms=3, label=name)
    left.set(xlabel="α (0: seed 0, 1: seed 1, aligned or not)", ylabel="test accuracy (%)",
             title="two seeds: the line before and after alignment, ± REPAIR")
    left.legend(fontsize=7, handlelength=4.0, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2,
                frameon=False)  # below the axes: inside, it covers the naive line's valley
    for k, (name, row) in enumerate(sblb.items()):
        curve = results.load_curve(row["file"])
        wide = {"lw": 4.0, "alpha": 0.45} if k == 0 else {}  # visible under a line that coincides with it
        right.plot(curve.alpha, curve.train_loss, color=f"C{k}", marker="o", ms=3, label=f"{name} (train)", **wide)
        right.plot(curve.alpha, curve.test_loss, color=f"C{k}", ls="--", marker="s", ms=3, label=f"{name} (test)",
                   **wide)
    right.set_yscale("log")
    readable_log_axis(right)
    right.set(xlabel="α along the lines, t along the curve (0: SB, 1: LB)", ylabel="cross-entropy (nats)",
              title="Keskar's SB and LB minima: line, aligned line, trained curve")
    right.legend(fontsize=7, handlelength=4.0, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2,
                 frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


def _fmt_barrier(row: dict[str, Any], key: str, scale: float = 1.0) -> str:
    return f"{scale * row[key]:.3g} (α {row[key + '_alpha']:.2g})" if key in row else "—"


def ordering_verdict(naive: float, permuted: float, repaired: float, endpoint: float, test_images: int) -> str:
    """Whether REPAIR's ordering naive < best alignment < best alignment + REPAIR ≤ endpoints holds, each step's
    difference of test accuracies (%) with its binomial standard error over ``test_images`` (one pair of seeds):
    "yes" when every strict step exceeds 2 standard errors and the last is not above the endpoints by more; "no"
    when a step goes the other way by more than 2 SE; else "not distinguishable"."""
    steps = [("best alignment − naive", permuted, naive, True), ("+ REPAIR − best alignment", repaired, permuted, True),
             ("+ REPAIR − best endpoint", repaired, endpoint, False)]
    told, answers = [], []
    for name, a, b, strict in steps:
        diff, se, _ = accuracy_difference([a], [b], test_images)
        if strict:  # a above b by more than 2 SE
            answers.append("not distinguishable" if within_noise(diff, se) else "yes" if diff > 0 else "no")
        else:  # a not above b by more than 2 SE
            answers.append("no" if diff > 2 * se else "yes")
        told.append(f"{name} {diff:+.2f} ± {se:.2f}")
    answer = "no" if "no" in answers else "not distinguishable" if "not distinguishable" in answers else "yes"
    return (f"Same ordering here (naive < best alignment < best alignment + REPAIR ≤ endpoints): **{answer}** "
            f"({naive:.2f} < {permuted:.2f} < {repaired:.2f} ≤ {endpoint:.2f} %; {'; '.join(told)} points, binomial "
            f"standard errors over {test_images} test images, one pair of seeds; within 2 SE is not distinguishable).")


def summary_markdown(p: Declared, pair: dict, sblb: dict, wall_s: float, kdir: Path) -> str:
    t, line, c = p.values("pair"), p.values("line"), p.values("curve")
    ends = pair["naive"]["endpoint_test_acc"]
    mids = {k: v["midpoint_test_acc"] for k, v in pair.items()}
    permuted = max(mids["weight matching"], mids["activation matching"])
    repaired = max(mids["weight matching + REPAIR"], mids["activation matching + REPAIR"])
    lines = [
        f"# Connectivity — preset `{p.name}`", "",
        f"Seeds 0 and 1 of `{t['model']}` {json.dumps(t.get('model_kwargs') or {})} trained {t['epochs']} epochs "
        f"({t['optimizer']}, lr {t['lr']:g}, batch {t['batch_size']}, "
        f"{t.get('train_subset') or 'all'} training images); every point evaluated on "
        f"{line.get('train_subset') or 'all'} train / {line.get('test_subset') or 'all'} test images, α grid "
        f"{line['alphas']}. Machine: {cpu_name()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; this invocation {wall_s / 60:.1f} min.", "",
        "| line between the seeds | test acc. at α = 0.5 (%) | lowest test acc. (%) | train-loss barrier | "
        "test-loss barrier | test-acc. barrier (points) |",
        "|---|---|---|---|---|---|",
        *(f"| {k} | {v['midpoint_test_acc']:.2f} | {v['min_test_acc']:.2f} | "
          f"{_fmt_barrier(v, 'barrier_train_loss')} | {_fmt_barrier(v, 'barrier_test_loss')} | "
          f"{_fmt_barrier(v, 'barrier_test_accuracy', 100)} |" for k, v in pair.items()),
        "",
        f"Endpoints: {ends[0]:.2f} / {ends[1]:.2f} % test accuracy. REPAIR's CIFAR-10 MLP (Jordan et al. 2023, 11 "
        f"hidden layers × 512): endpoints {REPAIR_MLP['endpoints']} %, naive midpoint {REPAIR_MLP['naive']} %, "
        f"permuted {REPAIR_MLP['permuted']} %, + REPAIR {REPAIR_MLP['repair']} %. "
        + ordering_verdict(mids["naive"], permuted, repaired, max(ends), pair["naive"]["test_images"]), "",
        f"Keskar SB/LB checkpoints: {kdir}/seed0; curve: {c['bends']}-bend Bézier, {c['epochs']} epochs "
        f"(SGD lr {c['lr']:g}, batch {c['batch_size']}, wd {c['weight_decay']:g}) on "
        f"{c.get('train_subset') or 'all'} training images, which the curve and both lines are evaluated on "
        f"(with {c.get('test_subset') or 'all'} test images; BatchNorm re-estimated at every point), t grid "
        f"{c['t']}.", "",
        "| path SB → LB | test acc. at the middle (%) | lowest test acc. (%) | train-loss barrier | test-loss barrier "
        "| test-acc. barrier (points) |",
        "|---|---|---|---|---|---|",
        *(f"| {k} | {v['midpoint_test_acc']:.2f} | {v['min_test_acc']:.2f} | "
          f"{_fmt_barrier(v, 'barrier_train_loss')} | {_fmt_barrier(v, 'barrier_test_loss')} | "
          f"{_fmt_barrier(v, 'barrier_test_accuracy', 100)} |" for k, v in sblb.items()),
        "",
        "A barrier is the largest rise of the loss (fall of the accuracy) above (below) the straight interpolation "
        "of the endpoints' values, over the grid; 0 means none on this grid.",
    ]
    return "\n".join(lines) + "\n"


@interruptible("connectivity")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    ap = PIPELINE.parser(__doc__)
    ap.add_argument("--keskar-out", type=Path, default=None,
                    help="the Keskar pipeline's run directory (default: runs/keskar_<keskar_model>_<keskar_preset>)")
    args = ap.parse_intermixed_args(argv)
    try:
        p = PIPELINE.load(args.preset, args.overrides)
        try:  # the nested preset too, before the first stage (not after ten of them)
            keskar.load_preset(p.own.keskar_preset)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"preset {p.name}: keskar_preset = {p.own.keskar_preset!r}: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.connectivity] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t0 = time.perf_counter()
    out = args.out or Path("runs") / f"connectivity_{p.name}"
    kdir = args.keskar_out or Path("runs") / f"keskar_{p.own.keskar_model}_{p.own.keskar_preset}"
    pair = p.values("pair")

    def rates() -> Rates:
        return Rates.for_network(pair["model"], pair.get("model_kwargs"), 10, (3, 32, 32),
                                 batch=min(pair["batch_size"], 256))

    try:
        stages = pair_stages(p, out) + sb_lb_stages(p, out, kdir)
        runner = PIPELINE.execute(stages, out, args, rates, p.to_dict())
    except (ValueError, OSError, data_mod.DataError) as exc:  # bad data or settings: one line; stages kept
        print(f"[experiments.connectivity] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    rows = {name: {**_row(path), "file": str(path)} for name, path in pair_files(out).items()}
    sblb = {name: {**_row(path), "file": str(path)} for name, path in sb_lb_files(p, out).items()}
    wall = time.perf_counter() - t0
    md = summary_markdown(p, rows, sblb, wall, kdir)
    write_summary(out, md, {"pair": rows, "sb_lb": sblb})
    line = p.values("line")
    fig = figure(rows, sblb, out / "connectivity.png",
                 f"preset {p.name}: seeds of {pair['model']} and Keskar {p.own.keskar_model} SB/LB ({kdir}); "
                 f"{line['test_subset'] or 'all'} test images per point; {cpu_name()}")
    (fig,) = copy_figures([fig], args.figures, [f"connectivity_{p.name}.png"])
    print(md)
    print(f"[experiments.connectivity] wrote {out / 'summary.md'} and {fig}; this invocation {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
