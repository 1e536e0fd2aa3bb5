"""The edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021) with minima's probes.

    python -m experiments.edge_of_stability --preset quick     # ≈ 5–10 min on 2 CPU cores
    python -m experiments.edge_of_stability --preset paper     # GPU work: cifar10-5k, η = 0.01, 2/150, 2/100

Full-batch gradient descent on Cohen et al.'s fc-tanh network (3072-200-200-10, tanh) with the square loss on the
first N CIFAR-10 training images (their ``cifar10-5k`` is the first 5,000, standardised with all 50,000's
statistics): the step size η is set so that 2/η is a chosen multiple of λ_max at initialisation (quick preset) or
given (paper preset), λ_max is probed every K steps (``--probe hessian:K``), and the run stops at a training-accuracy
goal or a step cap. Sharpness rises until it reaches 2/η and then hovers there. One Adam run probes the
preconditioned sharpness against (2 + 2β₁)/((1 − β₁)η). One SAM run (radius ``sam_rho``, at the first GD run's η)
probes λ_max against SAM's own edge λ_SAM = (‖g‖/2ρ)(√(1 + 8ρ/(η‖g‖)) − 1) < 2/η, from the measured full-batch
gradient norm (:func:`minima.optim.sam.sam_edge`). Writes every run into the run directory, ``summary.md``
(per run: the step where λ_max first reaches 0.9·2/η, and the median and range of λ_max/(2/η) afterwards) and
``edge_of_stability.png``.
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

from experiments._pipeline import Pipeline, copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core.allocator import cpu_name, keep_freed_memory
from minima.core.config import setting
from minima.curvature.hessian import hessian_operator, top_eigenvalues
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.files import checkpoint as ckpt_io
from minima.files import timeline
from minima.files.rundir import RunDir, write_text_atomic
from minima.geometry.evaluate import Batching
from minima.models import build_model, own_import
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.stages import Rates, Stage
from minima.studies.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EdgeOfStability:
    """The runs' own settings (the top level of the preset; [train] is minima.train's request)."""

    init_seed: int = setting(0, "seed of the initial weights (every run starts from them)")
    threshold_ratios: tuple[float, ...] = setting((1.75,), "GD runs: 2/η as multiples of λ_max at initialisation "
                                                  "(used when lrs is empty)")
    lrs: tuple[float, ...] = setting((), "GD runs: the step sizes η themselves", default_text="from threshold_ratios")
    probe_every: int = setting(25, "steps between probes", unit="steps")
    adam_lr: float | None = setting(2e-4, "the Adam run's step size (none: no Adam run)")
    sam_rho: float | None = setting(None, "a full-batch SAM run at the first GD run's η with this radius, probed "
                                    "against SAM's edge λ_SAM", default_text="no SAM run")


# Cohen et al.: fc-tanh, the first N images, square loss, full-batch steps (one per epoch) up to a step cap or 99 %
# training accuracy; [train] epochs is the step cap
SPEC = Spec("edge_of_stability", EdgeOfStability, {
    "train": Section(TrainConfig, {"model": "fc_tanh", "train_subset": 1000, "subset_mode": "first", "epochs": 1500,
                                   "batch_size": "full", "momentum": 0.0, "loss": "mse", "target_accuracy": 0.99,
                                   "eval_test": False, "eval_batch_size": 1000, "progress": False,
                                   "print_every": 100},
                     frozenset({"optimizer", "lr", "init_from", "probe", "probe_subset", "out"}),
                     "every run (minima.train; epochs = the step cap)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")


def load_data(p: Declared) -> data_mod.Dataset:
    """The first ``[train] train_subset`` training images."""
    t = p.values("train")
    return data_mod.load_source(t.get("data")).subset(train=t["train_subset"], mode="first")


def initial_lambda_max(p: Declared, ds: data_mod.Dataset, init: Path) -> float:
    """λ_max of the square loss at the initial weights on the run's images."""
    model = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(init))
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std,
                                                          Batching(p.values("train")["eval_batch_size"])), loss="mse")
    return float(top_eigenvalues(hessian_operator(obj), k=1, tol=1e-4).eigenvalues[0])


def _initialise(p: Declared, ds: data_mod.Dataset, out: Path) -> None:
    """``init.pt`` (the shared initial weights) and ``lambda0.json`` (λ_max there)."""
    t = p.values("train")
    init = out / "init.pt"
    if not init.exists():
        torch.manual_seed(p.own.init_seed)
        kwargs = dict(t.get("model_kwargs") or {})
        model = build_model(t["model"], ds.num_classes, trusted=own_import(t["model"]), **kwargs)
        meta = ckpt_io.make_meta(epoch=0, step=0, global_batch_size=len(ds.train), world_size=1,
                                 seed=p.own.init_seed, train_config={"loss": "mse"}, data=ds.describe())
        ckpt_io.save_checkpoint(ckpt_io.make_checkpoint(t["model"], {**kwargs, "num_classes": ds.num_classes},
                                                        model.state_dict(), meta), init)
    write_text_atomic(out / "lambda0.json", json.dumps({"lambda0": initial_lambda_max(p, ds, init)}) + "\n")


def lambda0(out: Path) -> float:
    return float(json.loads((out / "lambda0.json").read_text())["lambda0"])


@dataclass(frozen=True)
class RunPlan:
    """One run: its name in the plan, its optimiser and probe, and how its η follows from λ_max at initialisation."""

    name: str
    optimizer: str
    probe: str
    lr: Callable[[float], float]
    sam_rho: float | None = None

    def directory(self, out: Path) -> Path:
        """``gd_lr<η>``, ``adam_lr<η>`` or ``sam_lr<η>_rho<ρ>`` (η known once λ_max at initialisation is)."""
        lr = self.lr(lambda0(out))
        if self.optimizer == "sam":
            return out / f"sam_lr{lr:.4g}_rho{self.sam_rho:g}"
        return out / (f"gd_lr{lr:.4g}" if self.optimizer == "sgd" else f"adam_lr{lr:g}")


def run_plans(p: Declared) -> list[RunPlan]:
    runs = ([RunPlan(f"gd_lr{lr:.4g}", "sgd", "hessian", lambda _l, lr=lr: lr) for lr in p.own.lrs]
            or [RunPlan(f"gd_ratio{r:g}", "sgd", "hessian", lambda lam, r=r: 2.0 / (r * lam))
                for r in p.own.threshold_ratios])
    if p.own.adam_lr is not None:
        runs.append(RunPlan(f"adam_lr{p.own.adam_lr:g}", "adam", "preconditioned", lambda _l: p.own.adam_lr))
    if p.own.sam_rho is not None:
        first = runs[0]
        runs.append(RunPlan(f"sam_rho{p.own.sam_rho:g}", "sam", "hessian", first.lr, p.own.sam_rho))
    return runs


def stages(p: Declared, out: Path, data: Callable[[], data_mod.Dataset]) -> list[Stage]:
    """The initial weights and λ_max there (group ``init``), then one stage per run (its own group)."""
    t = p.values("train")

    def probe_cost(r: Rates) -> float:  # one Lanczos λ_max: about 15 products on every image
        return r.measurement({"hvp": 15}, len(data().train))

    found = [Stage("init", "init", (out / "lambda0.json").exists, lambda: _initialise(p, data(), out), probe_cost)]
    for run in run_plans(p):
        def fit(run: RunPlan = run) -> None:
            ds, d = data(), run.directory(out)
            lr = run.lr(lambda0(out))
            sam = {"sam_rho": run.sam_rho} if run.optimizer == "sam" else {}
            config = p.request("train", optimizer=run.optimizer, lr=lr, init_from=str(out / "init.pt"),
                               probe=(f"{run.probe}:{p.own.probe_every}",), probe_subset=len(ds.train), out=str(d),
                               **sam)
            print(f"[experiments.edge_of_stability] {run.name}: η = {lr:.4g} (2/η = {2 / lr:.4g}, λ_max at "
                  f"initialisation {lambda0(out):.4g})", flush=True)
            train(config, resume=(d / "last.pt").exists(), dataset=ds)

        def estimate(r: Rates, run: RunPlan = run) -> float:
            steps = t["epochs"] * (2 if run.optimizer == "sam" else 1)  # SAM: two passes per step
            return r.training(steps, len(data().train), 0) + t["epochs"] // max(p.own.probe_every, 1) * probe_cost(r)

        found.append(Stage(run.name, run.name, lambda run=run: (out / "lambda0.json").exists() and (
            run.directory(out) / "final.pt").exists(), fit, estimate, ("init",)))
    return found


def edge(rows: dict[str, np.ndarray]) -> np.ndarray:
    """The threshold a run's probe is held against: SAM's edge λ_SAM for a SAM run, else the optimiser's own."""
    return np.asarray(rows["sam_threshold"] if "sam_threshold" in rows else rows["threshold"])


def summarise(run_dir: Path, probe: str) -> dict[str, Any]:
    """The step where the probe first reaches 0.9 × its threshold (a SAM run: λ_SAM), and the median and range of
    value/threshold afterwards."""
    rows = timeline.load(run_dir / "probes.h5")[probe]
    ratio = np.asarray(rows["value"]) / edge(rows)
    reached = np.flatnonzero(ratio >= 0.9)
    after = ratio[reached[0]:] if len(reached) else np.array([])
    metrics = RunDir(run_dir).metrics()
    return {"run": run_dir.name, "probe": probe, "lr": float(rows["lr"][0]), "threshold": float(rows["threshold"][0]),
            "edge": "λ_SAM" if "sam_threshold" in rows else "own",
            "sam_threshold_first_last": ([float(rows["sam_threshold"][0]), float(rows["sam_threshold"][-1])]
                                         if "sam_threshold" in rows else None),
            "first_value": float(rows["value"][0]), "max_value": float(np.max(rows["value"])),
            "reached_step": int(rows["step"][reached[0]]) if len(reached) else None,
            "median_after": float(np.median(after)) if after.size else None,
            "range_after": [float(after.min()), float(after.max())] if after.size else None,
            "steps": int(metrics[-1]["step"]), "final_train_accuracy": float(metrics[-1]["train_accuracy"]),
            "final_train_loss": float(metrics[-1]["train_loss"])}


def figure(runs: list[tuple[Path, str]], path: Path, title: str) -> Path:
    fig = Figure(figsize=(11.0, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for k, (run_dir, probe) in enumerate(runs):
        rows = timeline.load(run_dir / "probes.h5")[probe]
        label = f"{run_dir.name} ({probe}, η = {rows['lr'][0]:g})"
        held = ("SAM's edge λ_SAM (from ‖g‖ at each probe)" if "sam_threshold" in rows
                else f"threshold {rows['threshold'][0]:.4g}")
        top.plot(rows["step"], np.asarray(rows["value"]) / edge(rows), "o-", ms=2.5, color=f"C{k}",
                 label=f"{label}, against {held}")
        metrics = RunDir(run_dir).metrics()
        bottom.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], color=f"C{k}", lw=1.0)
    top.axhline(1.0, color="0.4", ls="--", lw=1.0)
    top.set_ylabel("sharpness ÷ its stability threshold")
    top.set_title("GD: λ_max ÷ 2/η · Adam: preconditioned sharpness ÷ (2 + 2β₁)/((1 − β₁)η) · SAM: λ_max ÷ λ_SAM, "
                  "SAM's edge from ‖g‖ at each probe", fontsize=8)
    top.legend(fontsize=7)
    bottom.set_yscale("log")
    bottom.set(xlabel="step (full-batch: one per epoch)", ylabel="training loss (square)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


@interruptible("edge_of_stability")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    ap = PIPELINE.parser(__doc__)
    args = ap.parse_intermixed_args(argv)
    try:
        p = PIPELINE.load(args.preset, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.edge_of_stability] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t = p.values("train")
    t0 = time.perf_counter()
    out = args.out or Path("runs") / f"edge_of_stability_{p.name}"
    data = functools.cache(lambda: load_data(p))

    def rates() -> Rates:
        ds = data()
        return Rates.for_network(t["model"], t.get("model_kwargs"), ds.num_classes, ds.image_shape,
                                 batch=min(len(ds.train), 256))

    try:
        data()
        runner = PIPELINE.execute(stages(p, out, data), out, args, rates, p.to_dict())
    except (ValueError, OSError, data_mod.DataError) as exc:
        print(f"[experiments.edge_of_stability] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    runs = [(plan.directory(out), plan.probe) for plan in run_plans(p)]
    rows = [summarise(d, probe) for d, probe in runs]
    lam0 = lambda0(out)
    wall = time.perf_counter() - t0
    n, steps = t["train_subset"], t["epochs"]
    lines = [f"# Edge of stability — preset `{p.name}`", "",
             f"{t['model']} on the first {n} CIFAR-10 training images (standardised with the full training "
             f"set's statistics), square loss, full-batch steps, up to {steps} steps or {t['target_accuracy']:g} "
             f"training accuracy; λ_max at initialisation {lam0:.4g}; probes every {p.own.probe_every} steps on all "
             f"{n} images. Machine: {cpu_name()}, torch {torch.__version__}; this invocation {wall / 60:.1f} min.", "",
             "| run | probe | η | threshold | first | max | reaches 0.9·threshold at step | median / range after "
             "(× threshold) | steps | train acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = (f"{r['median_after']:.3f} / {r['range_after'][0]:.3f}–{r['range_after'][1]:.3f}"
                 if r["median_after"] is not None else "—")
        threshold = (f"λ_SAM {r['sam_threshold_first_last'][0]:.4g} → {r['sam_threshold_first_last'][1]:.4g} "
                     f"(2/η {r['threshold']:.4g})" if r["sam_threshold_first_last"] else f"{r['threshold']:.4g}")
        lines.append(f"| {r['run']} | {r['probe']} | {r['lr']:.4g} | {threshold} | {r['first_value']:.4g} | "
                     f"{r['max_value']:.4g} | {r['reached_step'] if r['reached_step'] is not None else 'not reached'} "
                     f"| {after} | {r['steps']} | {r['final_train_accuracy']:.3f} |")
    lines += ["", "Cohen et al. (2021), fc-tanh on cifar10-5k, MSE, η = 0.01: λ_max rises from ≈ 75–80 to 2/η = 200 at "
              "≈ 4,500 steps and stays at ≈ 200–210 until ≈ 9,000 steps.",
              "", "A SAM run's threshold is its own edge λ_SAM, which moves with the full-batch gradient norm ‖g‖ "
              "(first → last probe shown): λ_max at or below it is what SAM's stability predicts."]
    md = "\n".join(lines) + "\n"
    write_summary(out, md, {"lambda0": lam0, "runs": rows})
    fig = figure(runs, out / "edge_of_stability.png",
                 f"preset {p.name}: {t['model']}, first {n} images, square loss, full batch; {cpu_name()}")
    (fig,) = copy_figures([fig], args.figures, [f"edge_of_stability_{p.name}.png"])
    print(md)
    print(f"[experiments.edge_of_stability] wrote {out / 'summary.md'} and {fig}; {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
