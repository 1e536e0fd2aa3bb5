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

import argparse
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
from experiments._pipeline import StageClock, copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core import config as cfg
from minima.core.allocator import cpu_name, keep_freed_memory
from minima.core.config import setting
from minima.curve import run as run_curve
from minima.files import results
from minima.geometry.barriers import barriers
from minima.studies.align import AlignRequest, align
from minima.studies.curve import CurveRequest
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_line
from minima.studies.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs" / "pipelines"
# Jordan et al. (ICLR 2023), REPAIR, CIFAR-10 MLP (11 hidden layers × 512): test accuracy (%) of the endpoints and of
# the midpoint of the line without alignment, after permutation (alignment) and after REPAIR.
REPAIR_MLP = {"endpoints": 57.31, "naive": 10.23, "permuted": 35.01, "repair": 52.91}


@dataclass(frozen=True)
class Preset:
    """Every knob of the pipeline, with units (``experiments/configs/pipelines/connectivity_<name>.toml``)."""

    data: str | None = setting(None, "data source", default_text="$MINIMA_DATA, then the torchvision download")
    pair_model: str = setting("mlp", "network of the two seeds")
    pair_model_kwargs: dict = setting(help="its arguments", factory=dict)
    pair_train_subset: int | None = setting(None, "training images of the two seeds", unit="samples",
                                            default_text="all")
    pair_optimizer: str = setting("adam", "their optimiser")
    pair_lr: float = setting(1e-3, "their learning rate")
    pair_momentum: float = setting(0.9, "SGD momentum (pair_optimizer = sgd)")
    pair_weight_decay: float = setting(0.0, "their weight decay")
    pair_batch: int = setting(256, "their batch size", unit="samples")
    pair_epochs: int = setting(10, "their epochs", unit="epochs")
    pair_augment: bool = setting(False, "random crops and flips while training them")
    alphas: str = setting("0:1:11", "α grid of every line (and t grid of the curve), within [0, 1]")
    eval_train_subset: int | None = setting(5000, "training images every point is evaluated on", unit="samples",
                                            default_text="all")
    eval_test_subset: int | None = setting(5000, "test images every point is evaluated on", unit="samples",
                                           default_text="all")
    align_samples: int | None = setting(None, "training images activation matching correlates on",
                                        unit="samples", default_text="minima.align's default")
    keskar_model: str = setting("mlp", "network of the Keskar pipeline whose SB/LB checkpoints are used")
    keskar_preset: str = setting("quick", "that pipeline's preset")
    curve_bends: int = setting(1, "Bézier bends of the SB–LB curve")
    curve_epochs: int = setting(10, "its training epochs", unit="epochs")
    curve_batch: int = setting(128, "its batch size", unit="samples")
    curve_lr: float = setting(0.015, "its peak SGD learning rate")
    curve_weight_decay: float = setting(5e-4, "wd of its ½·wd·‖θ(t)‖² penalty")
    curve_train_subset: int | None = setting(10000, "training images it is trained and evaluated on",
                                             unit="samples", default_text="all")
    eval_batch_size: int = setting(1000, "evaluation batch size", unit="samples")


VARIANTS = (("naive", None, False), ("naive + REPAIR", None, True), ("weight matching", "weights", False),
            ("weight matching + REPAIR", "weights", True), ("activation matching", "activations", False),
            ("activation matching + REPAIR", "activations", True))


def _complete(path: Path) -> bool:
    return path.exists() and results.load_grid(path).complete


def _line(a: Path, b: Path, out: Path, p: Preset, repair: bool) -> SweepRequest:
    return SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas=p.alphas, repair=repair, data=p.data,
                        train_subset=p.eval_train_subset, test_subset=p.eval_test_subset, out=out,
                        resume=out.exists(), eval_batch_size=p.eval_batch_size, plot=False)


def _row(path: Path) -> dict[str, Any]:
    curve = results.load_curve(path)
    found = barriers(curve)
    mid = int(np.argmin(np.abs(curve.alpha - 0.5)))
    return {"endpoint_test_acc": [100 * float(curve.test_accuracy[0]), 100 * float(curve.test_accuracy[-1])],
            "midpoint_test_acc": 100 * float(curve.test_accuracy[mid]), "midpoint": float(curve.alpha[mid]),
            "min_test_acc": 100 * float(np.min(curve.test_accuracy)), **found}


def seed_pair(p: Preset, out: Path, stages: StageClock) -> dict[str, dict[str, Any]]:
    """Train the two seeds, align, evaluate every line; the rows of the first table."""
    nets = []
    for seed in (0, 1):
        run_dir = out / "pair" / f"seed{seed}"
        config = TrainConfig(model=p.pair_model, model_kwargs=dict(p.pair_model_kwargs), data=p.data,
                             train_subset=p.pair_train_subset, epochs=p.pair_epochs, batch_size=p.pair_batch,
                             optimizer=p.pair_optimizer, lr=p.pair_lr, momentum=p.pair_momentum,
                             weight_decay=p.pair_weight_decay, augment=p.pair_augment, seed=seed,
                             init_seed=100 + seed, out=str(run_dir), eval_batch_size=p.eval_batch_size)
        final = run_dir / "final.pt"
        stages.run(f"train seed {seed}", final.exists(),
                   lambda c=config, d=run_dir: train(c, resume=(d / "last.pt").exists()))
        nets.append(final)
    a, b = nets
    aligned = {None: b}
    for method in ("weights", "activations"):
        path = out / "pair" / f"seed1_{method}_aligned.pt"
        stages.run(f"align seed 1 to seed 0 ({method})", path.exists(), lambda m=method, q=path: align(AlignRequest(
            checkpoint_a=a, checkpoint_b=b, method=m, samples=p.align_samples, data=p.data,
            train_subset=p.pair_train_subset, out=q, eval_batch_size=p.eval_batch_size)))
        aligned[method] = path
    rows = {}
    for name, method, repair in VARIANTS:
        path = out / "pair" / f"line_{method or 'naive'}{'_repair' if repair else ''}.h5"
        stages.run(f"line: {name}", _complete(path), lambda q=path, m=method, r=repair: run_line(
            _line(a, aligned[m], q, p, r)))
        rows[name] = {**_row(path), "file": str(path)}
    return rows


def sb_lb(p: Preset, out: Path, kdir: Path, stages: StageClock) -> dict[str, dict[str, Any]]:
    """The Keskar checkpoints (trained when missing), their lines and the curve; the rows of the second table."""
    kname, kpreset = keskar.load_preset(p.keskar_preset)
    ds = None
    ckpts = {}
    for name, batch in (("sb", kpreset.sb_batch), ("lb", kpreset.lb_batch)):
        run_dir = kdir / "seed0" / name
        if ds is None and not (run_dir / "final.pt").exists():
            ds = data_mod.load_source(keskar.data_for(p.keskar_model, kpreset), kpreset.train_subset,
                                      kpreset.test_subset).subset(kpreset.train_subset, kpreset.test_subset, seed=0)
        stages.run(f"Keskar {kname} {name.upper()} network ({run_dir})", (run_dir / "final.pt").exists(),
                   lambda b=batch, d=run_dir, data=ds: keskar.train_regime(p.keskar_model, kpreset, b, 0, d, data))
        ckpts[name] = run_dir / "final.pt"
    folder = out / "sb_lb_curve"
    files = {"straight line SB → LB": folder / "line_unaligned.h5", "line SB → weight-matched LB": folder / "line.h5",
             f"Bézier curve SB → weight-matched LB ({p.curve_bends} bend)": folder / "curve.h5"}
    done = all(_complete(f) for f in files.values())
    stages.run("SB–LB: align, train the curve, evaluate the curve and both lines", done, lambda: run_curve(CurveRequest(
        checkpoint_a=ckpts["sb"], checkpoint_b=ckpts["lb"], align=True, bends=p.curve_bends, epochs=p.curve_epochs,
        batch_size=p.curve_batch, lr=p.curve_lr, weight_decay=p.curve_weight_decay, t=p.alphas, data=p.data,
        train_subset=p.curve_train_subset, test_subset=p.eval_test_subset, eval_batch_size=p.eval_batch_size,
        out=folder, resume=folder.exists())))
    return {name: {**_row(path), "file": str(path)} for name, path in files.items()}


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
    left.legend(fontsize=7, handlelength=4.0)
    for k, (name, row) in enumerate(sblb.items()):
        curve = results.load_curve(row["file"])
        wide = {"lw": 4.0, "alpha": 0.45} if k == 0 else {}  # visible under a line that coincides with it
        right.plot(curve.alpha, curve.train_loss, color=f"C{k}", marker="o", ms=3, label=f"{name} (train)", **wide)
        right.plot(curve.alpha, curve.test_loss, color=f"C{k}", ls="--", marker="s", ms=3, label=f"{name} (test)",
                   **wide)
    right.set_yscale("log")
    right.set(xlabel="α along the lines, t along the curve (0: SB, 1: LB)", ylabel="cross-entropy (nats)",
              title="Keskar's SB and LB minima: line, aligned line, trained curve")
    right.legend(fontsize=7, handlelength=4.0, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2,
                 frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


def _fmt_barrier(row: dict[str, Any], key: str, scale: float = 1.0) -> str:
    return f"{scale * row[key]:.3g} (α {row[key + '_alpha']:.2g})" if key in row else "—"


def summary_markdown(name: str, p: Preset, pair: dict, sblb: dict, wall_s: float, kdir: Path) -> str:
    ends = pair["naive"]["endpoint_test_acc"]
    mids = {k: v["midpoint_test_acc"] for k, v in pair.items()}
    permuted = max(mids["weight matching"], mids["activation matching"])
    repaired = max(mids["weight matching + REPAIR"], mids["activation matching + REPAIR"])
    ordered = mids["naive"] < permuted < repaired <= max(ends) + 1e-9
    lines = [
        f"# Connectivity — preset `{name}`", "",
        f"Seeds 0 and 1 of `{p.pair_model}` {json.dumps(p.pair_model_kwargs)} trained {p.pair_epochs} epochs "
        f"({p.pair_optimizer}, lr {p.pair_lr:g}, batch {p.pair_batch}, "
        f"{p.pair_train_subset or 'all'} training images); every point evaluated on {p.eval_train_subset or 'all'} "
        f"train / {p.eval_test_subset or 'all'} test images, α grid {p.alphas}. Machine: {cpu_name()}, torch "
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
        f"permuted {REPAIR_MLP['permuted']} %, + REPAIR {REPAIR_MLP['repair']} %. Same ordering here (naive < best "
        f"alignment < best alignment + REPAIR ≤ endpoints): **{'yes' if ordered else 'no'}** "
        f"({mids['naive']:.2f} < {permuted:.2f} < {repaired:.2f} ≤ {max(ends):.2f}).", "",
        f"Keskar SB/LB checkpoints: {kdir}/seed0; curve: {p.curve_bends}-bend Bézier, {p.curve_epochs} epochs "
        f"(SGD lr {p.curve_lr:g}, batch {p.curve_batch}, wd {p.curve_weight_decay:g}) on "
        f"{p.curve_train_subset or 'all'} training images, which the curve and both lines are evaluated on "
        f"(with {p.eval_test_subset or 'all'} test images; BatchNorm re-estimated at every point).", "",
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
    ap = argparse.ArgumentParser(prog="python -m experiments.connectivity", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick", help="quick, paper, smoke (experiments/configs/pipelines/"
                    "connectivity_<name>.toml) or a TOML file's path (default: quick)")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: runs/connectivity_<preset>)")
    ap.add_argument("--keskar-out", type=Path, default=None,
                    help="the Keskar pipeline's run directory (default: runs/keskar_<keskar_model>_<keskar_preset>)")
    ap.add_argument("--figures", type=Path, default=None, help="also copy the figure into this directory")
    args = ap.parse_args(argv)
    try:
        name, p = cfg.load_preset(Preset, CONFIGS, "connectivity_", args.preset)
        try:  # the nested preset too, before the first stage (not after ten of them)
            keskar.load_preset(p.keskar_preset)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"preset {name}: keskar_preset = {p.keskar_preset!r}: {exc}") from None
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.connectivity] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t0 = time.perf_counter()
    out = args.out or Path("runs") / f"connectivity_{name}"
    kdir = args.keskar_out or Path("runs") / f"keskar_{p.keskar_model}_{p.keskar_preset}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps({"preset": name, **cfg.to_dict(p)}, indent=2) + "\n")
    stages = StageClock("connectivity", 2 + 2 + len(VARIANTS) + 2 + 1, out / "stage_seconds.json")
    try:
        pair = seed_pair(p, out, stages)
        sblb = sb_lb(p, out, kdir, stages)
    except (ValueError, OSError) as exc:  # bad data or settings: one line; finished stages stay on disk
        print(f"[experiments.connectivity] error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    md = summary_markdown(name, p, pair, sblb, wall, kdir)
    write_summary(out, md, {"pair": pair, "sb_lb": sblb})
    fig = figure(pair, sblb, out / "connectivity.png",
                 f"preset {name}: seeds of {p.pair_model} and Keskar {p.keskar_model} SB/LB ({kdir}); "
                 f"{p.eval_test_subset or 'all'} test images per point; {cpu_name()}")
    (fig,) = copy_figures([fig], args.figures, [f"connectivity_{name}.png"])
    print(md)
    print(f"[experiments.connectivity] wrote {out / 'summary.md'} and {fig}; this invocation {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
