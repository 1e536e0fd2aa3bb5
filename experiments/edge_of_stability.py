"""The edge of stability (Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021) with minima's probes.

    python -m experiments.edge_of_stability --preset quick     # ≈ 5–10 min on 2 CPU cores
    python -m experiments.edge_of_stability --preset paper     # GPU work: cifar10-5k, η = 0.01, 2/150, 2/100

Full-batch gradient descent on Cohen et al.'s fc-tanh network (3072-200-200-10, tanh) with the square loss on the
first N CIFAR-10 training images (their ``cifar10-5k`` is the first 5,000, standardised with all 50,000's
statistics): the step size η is set so that 2/η is a chosen multiple of λ_max at initialisation (quick preset) or
given (paper preset), λ_max is probed every K steps (``--probe hessian:K``), and the run stops at a training-accuracy
goal or a step cap. Sharpness rises until it reaches 2/η and then hovers there. One Adam run probes the
preconditioned sharpness against (2 + 2β₁)/((1 − β₁)η). Writes every run into the run directory, ``summary.md``
(per run: the step where λ_max first reaches 0.9·2/η, and the median and range of λ_max/(2/η) afterwards) and
``edge_of_stability.png``.
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
import torch
from matplotlib.figure import Figure

from experiments._pipeline import StageClock, copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core import config as cfg
from minima.core.allocator import cpu_name, keep_freed_memory
from minima.core.config import setting
from minima.curvature.hessian import hessian_operator, top_eigenvalues
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.files import checkpoint as ckpt_io
from minima.files import timeline
from minima.files.rundir import RunDir
from minima.geometry.evaluate import Batching
from minima.models import build_model
from minima.studies.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs" / "pipelines"


@dataclass(frozen=True)
class Preset:
    """The runs' settings, with units (``experiments/configs/pipelines/edge_of_stability_<name>.toml``)."""

    data: str | None = setting(None, "data source", default_text="$MINIMA_DATA, then the torchvision download")
    train_subset: int = setting(1000, "the first N training images", unit="samples")
    model: str = setting("fc_tanh", "network")
    model_kwargs: dict = setting(help="its arguments", factory=dict)
    init_seed: int = setting(0, "seed of the initial weights")
    threshold_ratios: tuple[float, ...] = setting((1.75,), "GD runs: 2/η as multiples of λ_max at initialisation "
                                                  "(used when lrs is empty)")
    lrs: tuple[float, ...] = setting((), "GD runs: the step sizes η themselves", default_text="from threshold_ratios")
    max_steps: int = setting(1500, "step cap of every run (one step per epoch: full batch)", unit="steps")
    target_accuracy: float = setting(0.99, "stop at this training accuracy")
    probe_every: int = setting(25, "steps between probes", unit="steps")
    adam_lr: float | None = setting(2e-4, "the Adam run's step size (none: no Adam run)")
    eval_batch_size: int = setting(1000, "evaluation and probe batch size", unit="samples")


def initial_lambda_max(p: Preset, ds: data_mod.Dataset, init: Path) -> float:
    """λ_max of the square loss at the initial weights on the run's images."""
    model = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(init))
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(p.eval_batch_size)),
                           loss="mse")
    return float(top_eigenvalues(hessian_operator(obj), k=1, tol=1e-4).eigenvalues[0])


def _init_checkpoint(p: Preset, ds: data_mod.Dataset, out: Path) -> Path:
    if out.exists():
        return out
    torch.manual_seed(p.init_seed)
    kwargs = dict(p.model_kwargs)
    model = build_model(p.model, ds.num_classes, **kwargs)
    meta = ckpt_io.make_meta(epoch=0, step=0, global_batch_size=len(ds.train), world_size=1, seed=p.init_seed,
                             train_config={"loss": "mse"}, data=ds.describe())
    return ckpt_io.save_checkpoint(ckpt_io.make_checkpoint(p.model, {**kwargs, "num_classes": ds.num_classes},
                                                           model.state_dict(), meta), out)


def _run(p: Preset, ds: data_mod.Dataset, init: Path, out: Path, optimizer: str, lr: float, probe: str) -> Path:
    config = TrainConfig(model=p.model, model_kwargs=dict(p.model_kwargs), data=p.data, train_subset=p.train_subset,
                         subset_mode="first", epochs=p.max_steps, batch_size="full", optimizer=optimizer, lr=lr,
                         momentum=0.0, loss="mse", init_from=str(init), target_accuracy=p.target_accuracy,
                         eval_test=False, probe=(f"{probe}:{p.probe_every}",), probe_subset=len(ds.train),
                         eval_batch_size=p.eval_batch_size, out=str(out), progress=False)
    train(config, resume=(out / "last.pt").exists(), dataset=ds)
    return out


def summarise(run_dir: Path, probe: str) -> dict[str, Any]:
    """The step where the probe first reaches 0.9 × its threshold, and the median and range of value/threshold
    afterwards."""
    rows = timeline.load(run_dir / "probes.h5")[probe]
    ratio = np.asarray(rows["value"]) / np.asarray(rows["threshold"])
    reached = np.flatnonzero(ratio >= 0.9)
    after = ratio[reached[0]:] if len(reached) else np.array([])
    metrics = RunDir(run_dir).metrics()
    return {"run": run_dir.name, "probe": probe, "lr": float(rows["lr"][0]), "threshold": float(rows["threshold"][0]),
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
        top.plot(rows["step"], np.asarray(rows["value"]) / np.asarray(rows["threshold"]), "o-", ms=2.5,
                 color=f"C{k}", label=f"{label}, threshold {rows['threshold'][0]:.4g}")
        metrics = RunDir(run_dir).metrics()
        bottom.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], color=f"C{k}", lw=1.0)
    top.axhline(1.0, color="0.4", ls="--", lw=1.0)
    top.set_ylabel("sharpness / its stability threshold\n(λ_max·η/2 for GD; Adam: preconditioned)")
    top.legend(fontsize=7)
    bottom.set_yscale("log")
    bottom.set(xlabel="step (full-batch: one per epoch)", ylabel="training loss (square)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


@interruptible("edge_of_stability")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.edge_of_stability", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick", help="quick, paper, smoke or a TOML file's path (default: quick)")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: runs/edge_of_stability_<preset>)")
    ap.add_argument("--figures", type=Path, default=None, help="also copy the figure into this directory")
    args = ap.parse_args(argv)
    try:
        name, p = cfg.load_preset(Preset, CONFIGS, "edge_of_stability_", args.preset)
        keep_freed_memory()
        t0 = time.perf_counter()
        out = args.out or Path("runs") / f"edge_of_stability_{name}"
        out.mkdir(parents=True, exist_ok=True)
        ds = data_mod.load_source(p.data, p.train_subset).subset(train=p.train_subset, mode="first")
        init = _init_checkpoint(p, ds, out / "init.pt")
        lam0 = initial_lambda_max(p, ds, init)
        lrs = list(p.lrs) or [2.0 / (r * lam0) for r in p.threshold_ratios]
        stages = StageClock("edge_of_stability", len(lrs) + (p.adam_lr is not None))
        runs = [(out / f"gd_lr{lr:.4g}", "sgd", lr, "hessian") for lr in lrs]
        if p.adam_lr is not None:
            runs.append((out / f"adam_lr{p.adam_lr:g}", "adam", p.adam_lr, "preconditioned"))
        for run_dir, optimizer, lr, probe in runs:
            what = (f"gradient descent, η = {lr:.4g} (2/η = {2 / lr:.4g}, λ_max at initialisation {lam0:.4g})"
                    if optimizer == "sgd" else f"Adam, η = {lr:g}")
            stages.run(what, (run_dir / "final.pt").exists(),
                       lambda d=run_dir, o=optimizer, r=lr, q=probe: _run(p, ds, init, d, o, r, q))
    except (ValueError, OSError) as exc:
        print(f"[experiments.edge_of_stability] error: {exc}", file=sys.stderr)
        return 2
    rows = [summarise(d, probe) for d, _, _, probe in runs]
    wall = time.perf_counter() - t0
    lines = [f"# Edge of stability — preset `{name}`", "",
             f"{p.model} on the first {p.train_subset} CIFAR-10 training images (standardised with the full training "
             f"set's statistics), square loss, full-batch steps, up to {p.max_steps} steps or {p.target_accuracy:g} "
             f"training accuracy; λ_max at initialisation {lam0:.4g}; probes every {p.probe_every} steps on all "
             f"{p.train_subset} images. Machine: {cpu_name()}, torch {torch.__version__}; this invocation "
             f"{wall / 60:.1f} min.", "",
             "| run | probe | η | threshold | first | max | reaches 0.9·threshold at step | median / range after "
             "(× threshold) | steps | train acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = (f"{r['median_after']:.3f} / {r['range_after'][0]:.3f}–{r['range_after'][1]:.3f}"
                 if r["median_after"] is not None else "—")
        lines.append(f"| {r['run']} | {r['probe']} | {r['lr']:.4g} | {r['threshold']:.4g} | {r['first_value']:.4g} | "
                     f"{r['max_value']:.4g} | {r['reached_step'] if r['reached_step'] is not None else 'not reached'} "
                     f"| {after} | {r['steps']} | {r['final_train_accuracy']:.3f} |")
    lines += ["", "Cohen et al. (2021), fc-tanh on cifar10-5k, MSE, η = 0.01: λ_max rises from ≈ 75–80 to 2/η = 200 at "
              "≈ 4,500 steps and stays at ≈ 200–210 until ≈ 9,000 steps."]
    md = "\n".join(lines) + "\n"
    write_summary(out, md, {"lambda0": lam0, "runs": rows})
    fig = figure([(d, probe) for d, _, _, probe in runs], out / "edge_of_stability.png",
                 f"preset {name}: {p.model}, first {p.train_subset} images, "
                 f"square loss, full batch; {cpu_name()}")
    (fig,) = copy_figures([fig], args.figures, [f"edge_of_stability_{name}.png"])
    print(md)
    print(f"[experiments.edge_of_stability] wrote {out / 'summary.md'} and {fig}; {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
