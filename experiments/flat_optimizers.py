"""SGD vs SAM vs ASAM vs SWA from the same initial weights: accuracy, sharpness and the geometry between them.

    python -m experiments.flat_optimizers --preset quick     # ≈ 6 min on 2 CPU cores (the Keskar quick BN-MLP)
    python -m experiments.flat_optimizers --preset paper     # GPU work: WideResNet-16-8, 200 epochs (see the preset)
    python -m experiments.flat_optimizers --preset quick --dry-run   # the plan and its estimate, nothing run

Four runs share the initial weights (init seed 1337 + seed), the data order and every ``[train]`` setting: SGD;
SAM (Foret et al. 2021, radius ``sam_rho``) and ASAM (Kwon et al. 2021, ``asam_rho``, ``asam_eta``) around that SGD;
and SGD with stochastic weight averaging from epoch ``swa_start`` (Izmailov et al. 2018; the average with its
BatchNorm statistics recomputed is ``swa.pt``). Then, on the four minima (SGD, SAM, ASAM: ``final.pt``; SWA:
``swa.pt``): the exact train/test loss and accuracy (``evaluation.json``); λ_max, the Hessian trace, Andriushchenko
et al.'s adaptive worst-case sharpness and Keskar's φ (``[measure]``: ``minima.sharpness``'s request) in
``measures.h5``; the line from SGD's to SAM's minimum, before and after aligning SAM's hidden units to SGD's
(``[line]``, ``[align]``); and the plane through the three minima named by ``plane`` (``[plane]``). Writes
``summary.md`` (one table) and ``flat_optimizers.png`` (one figure).

Every measure is of the function the network computes at test time unless ``[measure] bn_mode`` says otherwise. The
preset is a nested request (:mod:`minima.pipelines.declared`); ``KEY=VALUE`` overrides any value (``sam_rho=0.1``,
``train.epochs=5``); the stages are resumable and skipped when complete (:mod:`minima.pipelines.stages`).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

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
from minima.figures import overlay_marks, plot_curves, plot_planes
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.geometry.barriers import barriers
from minima.models import build_model, own_import
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.runs import evaluate_run, evaluation_path
from minima.pipelines.stages import Rates, Stage
from minima.studies.align import AlignRequest, align
from minima.studies.align import units_moved as units_of
from minima.studies.grid import parse_axis
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_line
from minima.studies.sharpness import block_jobs, measure, measure_request_type, recorded, result_jobs
from minima.studies.surface import SurfaceRequest, axis_points
from minima.studies.surface import run as run_plane
from minima.studies.train import TrainConfig, load_dataset, train, validate_config

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sgd", "sam", "asam", "swa")
# Published test error (%) of WideResNet-16-8 on CIFAR-10 with the reference recipe (davda54/sam's README; Kwon et
# al. 2021, Table 2): the paper preset's yardstick.
PUBLISHED = {"sgd": 3.20, "sam": 2.86, "asam": 2.55}


@dataclass(frozen=True)
class FlatOptimizers:
    """The pipeline's own settings (the top level of its preset; the tables are library requests)."""

    seed: int = setting(0, "seed of shuffling and augmentation; the initial weights are init seed 1337 + seed")
    sam_rho: float = setting(0.05, "SAM's radius ρ (a step of length ρ in parameter units)")
    asam_rho: float = setting(2.0, "ASAM's radius ρ (relative to each weight's magnitude: ‖T⁻¹ε‖ = ρ)")
    asam_eta: float = setting(0.0, "ASAM's η in T = |w| + η")
    sam_base: str = setting("sgd", "the optimiser SAM and ASAM step with (sgd or adam; the SGD and SWA runs use "
                            "[train] optimizer)")
    swa_start: int = setting(7, "the SWA run averages the weights of every epoch after this many", unit="epochs")
    swa_lr: float = setting(0.01, "the SWA run's learning rate from swa_start on")
    swa_anneal_epochs: int = setting(0, "cosine annealing to swa_lr over this many epochs (0: at once)",
                                     unit="epochs")
    plane: tuple[str, ...] = setting(("sgd", "sam", "swa"), f"the three minima the plane goes through, of {RUNS}")


SPEC = Spec("flat_optimizers", FlatOptimizers, {
    # the runs' shared recipe: the BN-MLP of the Keskar quick preset, SGD with momentum and weight decay, cosine
    "train": Section(TrainConfig, {"model": "mlp", "model_kwargs": {"input_shape": [3, 32, 32],
                                                                    "widths": [512, 512, 512], "batchnorm": True},
                                   "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                                   "batch_size": 128, "epochs": 10, "schedule": "cosine", "eval_batch_size": 1000},
                     frozenset({"sam_rho", "sam_base", "asam_eta", "swa_start", "swa_lr", "swa_anneal_epochs",
                                "seed", "init_seed", "out"}),
                     "every run (minima.train; the optimiser of SGD and SWA)"),
    # λ_max, trace, worst-case sharpness and Keskar's φ of the four minima, BatchNorm in eval mode
    "measure": Section(measure_request_type(), {"metrics": ["hessian", "trace", "worst_case", "keskar"], "topk": 1,
                                                "eps": (1e-3,), "subspace": 0, "maxiter": 10, "trace_method": "hutchpp",
                                                "trace_max_probes": 30, "bn_mode": "eval", "train_subset": 1024,
                                                "worst_n": 1024, "eval_batch_size": 1024},
                       frozenset({"checkpoints", "out", "trust_import", "metrics_file"}),
                       "sharpness of the four minima (minima.sharpness)"),
    "align": Section(AlignRequest, {"method": "weights"},
                     frozenset({"checkpoint_a", "checkpoint_b", "out", "overwrite", "trust_import"}),
                     "SAM's hidden units matched to SGD's (minima.align)"),
    "line": Section(SweepRequest, {"alphas": "-0.5:1.5:21", "bn": "recompute", "train_subset": 5000,
                                   "test_subset": 2000, "eval_batch_size": 1000},
                    frozenset({"checkpoint_a", "checkpoint_b", "out", "resume", "trust_import"}),
                    "the SGD → SAM lines (minima.interpolate)"),
    "plane": Section(SurfaceRequest, {"x": "auto:11", "y": "auto:11", "bn": "recompute", "train_subset": 2000,
                                      "test_subset": 1000, "eval_batch_size": 1000},
                     frozenset({"checkpoints", "trajectory", "out", "resume", "trust_import", "yes"}),
                     "the plane through three minima (minima.surface)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")


def weights(run: str) -> str:
    """Which of a run's checkpoints is its minimum: SWA's averaged ``swa``, the others' ``final``."""
    return "swa" if run == "swa" else "final"


def minimum(out: Path, run: str) -> Path:
    """The minimum a run contributes: SWA's averaged ``swa.pt``, the others' ``final.pt``."""
    return out / run / f"{weights(run)}.pt"


def run_config(p: Declared, run: str, out: Path) -> TrainConfig:
    """One run's training request: [train] with this run's optimiser settings, the shared seed and initial weights."""
    own = p.own
    extra: dict[str, Any] = {}
    if run in ("sam", "asam"):
        extra = {"optimizer": run, "sam_base": own.sam_base,
                 "sam_rho": own.sam_rho if run == "sam" else own.asam_rho}
        if run == "asam":
            extra["asam_eta"] = own.asam_eta
    elif run == "swa":
        extra = {"swa_start": own.swa_start, "swa_lr": own.swa_lr, "swa_anneal_epochs": own.swa_anneal_epochs}
    return p.request("train", seed=own.seed, init_seed=1337 + own.seed, out=str(out / run), **extra)


def check(p: Declared) -> None:
    """What the requests cannot check by themselves: the plane's three names, SAM's base, SWA's start."""
    if len(p.own.plane) != 3 or len(set(p.own.plane)) != 3 or not set(p.own.plane) <= set(RUNS):
        raise ValueError(f"plane must name three different runs of {list(RUNS)}; got {list(p.own.plane)}")
    t = p.values("train")
    if t["optimizer"] not in ("sgd", "adam"):
        raise ValueError(f"[train] optimizer is the SGD and SWA runs' base (sgd or adam), not {t['optimizer']!r}; "
                         "SAM and ASAM are this pipeline's own runs")
    for run in RUNS:  # every run's request validated before the first stage
        validate_config(run_config(p, run, Path("runs")))
    result_jobs(p.request("measure", checkpoints=[Path("x.pt")], out=Path("x.h5")))  # the metrics' parameters


def stages(p: Declared, out: Path, data: Callable[[], data_mod.Dataset]) -> list[Stage]:
    """Four training stages (one group each: ``--shard`` spreads them), then the comparison (group ``compare``):
    evaluate, measure, align, the two lines, the plane."""
    t = p.values("train")
    model = t["model"]
    trust = own_import(model)
    found: list[Stage] = []
    for run in RUNS:
        def fit(run: str = run) -> Path:
            d = out / run
            return train(run_config(p, run, out), resume=(d / "last.pt").exists(), dataset=data())

        def estimate(r: Rates, run: str = run) -> float:
            ds = data()
            passes = 2 if run in ("sam", "asam") else 1  # SAM: a second forward-backward per step
            return passes * r.training(t["epochs"], len(ds.train), len(ds.test))

        found.append(Stage(f"train_{run}", run, minimum(out, run).exists, fit, estimate))
    trained = tuple(s.name for s in found)
    minima_ = [minimum(out, r) for r in RUNS]
    measure_req = p.request("measure", checkpoints=minima_, out=out / "measures.h5", trust_import=trust)
    aligned = out / "sam_aligned_to_sgd.pt"
    lines = {"line_sgd_sam.h5": minimum(out, "sam"), "line_sgd_sam_aligned.h5": aligned}
    plane_file = out / "plane.h5"

    def evaluate_all() -> None:
        for run in RUNS:
            evaluate_run(out / run, trust, t["eval_batch_size"], t.get("data_root"), weights=weights(run))

    def measure_estimate(r: Rates) -> float:
        ds = data()
        net = build_model(model, ds.num_classes, trusted=trust, **dict(t.get("model_kwargs") or {}))
        n = measure_req.train_subset or len(ds.train)
        jobs = block_jobs(result_jobs(measure_req), net, measure_req.blocks, measure_req.curvature)
        return len(RUNS) * sum(r.measurement(m.cost(job), n) for m, _, job in jobs if m.cost is not None)

    def do_align() -> None:
        align(p.request("align", checkpoint_a=minimum(out, "sgd"), checkpoint_b=minimum(out, "sam"), out=aligned,
                        overwrite=True, trust_import=trust))

    def do_lines() -> None:
        for name, end in lines.items():
            path = out / name
            run_line(p.request("line", checkpoint_a=minimum(out, "sgd"), checkpoint_b=end, out=path,
                               resume=path.exists(), trust_import=trust))

    def lines_done() -> bool:
        return all((out / n).exists() and results.load_curve(out / n).complete for n in lines)

    def line_estimate(r: Rates) -> float:
        ds = data()
        v = p.values("line")
        points = len(parse_axis(v["alphas"]))
        n_train, n_test = v.get("train_subset") or len(ds.train), v.get("test_subset") or len(ds.test)
        return len(lines) * r.grid(points, 2 * n_train + n_test)

    def do_plane() -> None:
        run_plane(p.request("plane", checkpoints=[minimum(out, r) for r in p.own.plane], out=plane_file,
                            resume=plane_file.exists(), trust_import=trust, yes=True))

    def plane_estimate(r: Rates) -> float:
        ds = data()
        v = p.values("plane")
        points = axis_points(v["x"], "x") * axis_points(v["y"], "y")
        n_train, n_test = v.get("train_subset") or len(ds.train), v.get("test_subset") or len(ds.test)
        return r.grid(points, 2 * n_train + n_test)

    def evaluate_estimate(r: Rates) -> float:
        ds = data()
        return len(RUNS) * r.grid(1, len(ds.train) + len(ds.test))

    found += [
        Stage("evaluate", "compare", lambda: all(
            evaluation_path(out / run, weights(run)).exists() for run in RUNS),
            evaluate_all, evaluate_estimate, trained),
        Stage("measure", "compare", lambda: recorded(measure_req), lambda: measure(measure_req), measure_estimate,
              trained),
        Stage("align", "compare", aligned.exists, do_align, lambda r: 0.0, trained),
        Stage("lines", "compare", lines_done, do_lines, line_estimate, (*trained, "align")),
        Stage("plane", "compare", lambda: plane_file.exists() and results.load_grid(plane_file).complete, do_plane,
              plane_estimate, trained),
    ]
    return found


# ------------------------------------------------------------------------------------------------ summary
MEASURES = (("lambda_max", "λ_max"), ("trace", "trace of H"), ("worst_case", "worst-case sharpness"),
            ("keskar", "Keskar φ (%)"))


def rows(out: Path) -> dict[str, dict[str, Any]]:
    """Per run, from the files the stages wrote: accuracy and loss, the epochs, and the four sharpness measures."""
    found: dict[str, dict[str, Any]] = {}
    for run in RUNS:
        ev = json.loads(evaluation_path(out / run, weights(run)).read_text())
        found[run] = {k: float(v) for k, v in ev.items()}
    for r in results.load_sharpness(out / "measures.h5"):
        run = _run_of(str(r["checkpoint"]), out)  # a result's attribute: the measured file's path
        kind = str(r["metric_kind"])
        if kind == "keskar" and not str(r["metric"]).startswith("keskar_full"):
            continue  # a random-subspace φ, when [measure] subspace asks for one: the table shows the full space's
        found[run]["lambda_max" if kind == "hessian" else kind] = float(r["value"])
    return found


def _run_of(checkpoint: str, out: Path) -> str:
    """Which run a measured checkpoint is (by its path)."""
    path = Path(checkpoint).resolve()
    for run in RUNS:
        if path == minimum(out, run).resolve():
            return run
    raise ValueError(f"{checkpoint} is not one of this pipeline's minima")


def figure(out: Path, table: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """One figure: the test accuracy and the four measures per run (top row), the SGD → SAM lines before and after
    alignment (bottom left), the plane through three minima (bottom right)."""
    fig = Figure(figsize=(15.0, 9.0), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.0, 1.5))
    axes = top.subplots(1, 1 + len(MEASURES))
    colours = {run: f"C{k}" for k, run in enumerate(RUNS)}
    for ax, (key, label) in zip(axes, (("test_accuracy", "test accuracy (%)"), *MEASURES), strict=True):
        values = [table[r].get(key, np.nan) * (100 if key == "test_accuracy" else 1) for r in RUNS]
        bars = ax.bar(RUNS, values, color=[colours[r] for r in RUNS])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        if key == "test_accuracy":
            finite = [v for v in values if np.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) - 2, max(finite) + 1)
        ax.margins(y=0.15)
    left, right = bottom.subplots(1, 2)
    curves = [results.load_curve(out / "line_sgd_sam.h5"), results.load_curve(out / "line_sgd_sam_aligned.h5")]
    moved, units = units_moved(out / "sam_aligned_to_sgd.pt")
    same = " — the two lines coincide" if moved == 0 else ""
    plot_curves(curves, left, labels=["SGD → SAM", f"SGD → SAM aligned to SGD ({moved} of {units} units moved)"],
                xlabel="α (θ = (1 − α)·θ_SGD + α·θ_SAM)",
                title=f"the line between SGD's and SAM's minima{same}")
    grid = results.load_grid(out / "plane.h5")
    plot_planes([grid], right, labels=["plane"])
    overlay_marks(right, grid)
    right.set_title(f"training loss on the plane through {', '.join(json.loads(grid.attrs.get('marks', '{}')))}",
                    fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def markdown(p: Declared, table: dict[str, dict[str, Any]], out: Path, wall: float) -> str:
    t, m = p.values("train"), p.values("measure")
    own = p.own
    lines = [f"# Flat-minima optimisers — preset `{p.name}`", "",
             f"{t['model']} ({json.dumps(t.get('model_kwargs') or {})}) on {t.get('data') or 'CIFAR-10'} "
             f"(train subset {t.get('train_subset') or 'all'}, test subset {t.get('test_subset') or 'all'}), "
             f"{t['epochs']} epochs, batch {t['batch_size']}, {t['optimizer']} lr {t['lr']:g} (momentum "
             f"{t['momentum']:g}, weight decay {t['weight_decay']:g}, {t['schedule']} schedule), seed {own.seed}, the "
             f"same initial weights for every run. SAM ρ = {own.sam_rho:g}; ASAM ρ = {own.asam_rho:g}, η = "
             f"{own.asam_eta:g}; SWA from epoch {own.swa_start} at lr {own.swa_lr:g}. Measures on "
             f"{m.get('train_subset') or 'all'} training images, BatchNorm {m['bn_mode']}; worst-case sharpness "
             f"ρ = {m.get('worst_rho', 0.002):g} (adaptive ℓ∞, m = {m.get('worst_m', 128)}). Machine: {cpu_name()}, "
             f"torch {torch.__version__}; this invocation {wall / 60:.1f} min.", "",
             "| run | train acc | test acc | test loss | λ_max | trace | worst-case | Keskar φ (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        r = table[run]
        lines.append(f"| {run} | {100 * r['train_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | "
                     f"{r['test_loss']:.4f} | {r.get('lambda_max', float('nan')):.4g} | "
                     f"{r.get('trace', float('nan')):.4g} | {r.get('worst_case', float('nan')):.4g} | "
                     f"{r.get('keskar', float('nan')):.4g} |")
    acc = {r: 100 * table[r]["test_accuracy"] for r in RUNS}
    n = _test_images(out)
    said = []
    for r in RUNS[1:]:
        diff, se, _ = accuracy_difference([acc[r]], [acc["sgd"]], n)
        said.append(f"{r} − sgd = {diff:+.2f} ± {se:.2f} points ("
                    f"{'not distinguishable' if within_noise(diff, se) else 'better' if diff > 0 else 'worse'})")
    lines += ["", f"Test accuracy on {n} test images; one seed, so the standard error is binomial over the test "
              "images: " + "; ".join(said) + "."]
    barrier = {name: barriers(results.load_curve(out / name))["barrier_train_loss"]
               for name in ("line_sgd_sam.h5", "line_sgd_sam_aligned.h5")}
    moved, units = units_moved(out / "sam_aligned_to_sgd.pt")
    lines += ["", "Loss barrier on the line SGD → SAM (max over α ∈ [0, 1] of the training loss minus the linear "
              f"interpolation of its ends): {barrier['line_sgd_sam.h5']:.4g} nats; after aligning SAM's hidden units "
              f"to SGD's ({moved} of {units} units moved): {barrier['line_sgd_sam_aligned.h5']:.4g} nats."]
    if t["model"] in ("wrn16_8", "wide_resnet"):
        lines += ["", "Published test error (davda54/sam's WideResNet-16-8 — 3 units per group, 17,158,106 parameters "
                  "—, 200 epochs, label smoothing, cutout): " + ", ".join(
            f"{k} {v:.2f} %" for k, v in PUBLISHED.items()) + "."]
    return "\n".join(lines) + "\n"


def units_moved(aligned: Path) -> tuple[int, int]:
    """How many hidden units the alignment permuted, of how many (0 of N: SAM's units already matched SGD's — from
    the same initial weights and data order they often do, and the two lines are one)."""
    return units_of(ckpt_io.load_checkpoint(aligned)["meta"]["alignment"]["permutations"])


def _test_images(out: Path) -> int:
    """The test images the runs were evaluated on (their checkpoints record it)."""
    return int(ckpt_io.load_checkpoint(out / "sgd" / "final.pt")["meta"]["data"]["test_size"])


@interruptible("flat_optimizers")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    ap = PIPELINE.parser(__doc__)
    args = ap.parse_intermixed_args(argv)
    try:
        p = PIPELINE.load(args.preset, args.overrides)
        check(p)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.flat_optimizers] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t = p.values("train")
    t0 = time.perf_counter()
    out = args.out or Path("runs") / f"flat_optimizers_{p.name}"

    data = functools.cache(lambda: load_dataset(run_config(p, "sgd", out)))  # every run's data: the same request

    def rates() -> Rates:
        ds = data()
        return Rates.for_network(t["model"], t.get("model_kwargs"), ds.num_classes, ds.image_shape,
                                 batch=min(t["batch_size"], 256), keskar=True)

    try:
        data()
        runner = PIPELINE.execute(stages(p, out, data), out, args, rates, p.to_dict())
    except (ValueError, OSError, data_mod.DataError) as exc:
        print(f"[experiments.flat_optimizers] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    table = rows(out)
    wall = time.perf_counter() - t0
    md = markdown(p, table, out, wall)
    write_summary(out, md, {"runs": table})
    fig = figure(out, table, out / "flat_optimizers.png",
                 f"preset {p.name}: SGD, SAM (ρ {p.own.sam_rho:g}), ASAM (ρ {p.own.asam_rho:g}), SWA (from epoch "
                 f"{p.own.swa_start}) from the same initial weights · {t['model']} · {cpu_name()}")
    (fig,) = copy_figures([fig], args.figures, [f"flat_optimizers_{p.name}.png"])
    print(md)
    print(f"[experiments.flat_optimizers] wrote {out / 'summary.md'} and {fig}; {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
