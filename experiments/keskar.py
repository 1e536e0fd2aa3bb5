"""Keskar et al. (2017) end to end: SB vs LB training, the parametric plot, sharpness, a summary beside the paper.

    python -m experiments.keskar --model mlp --preset quick            # 5–8 min on 2 CPU cores
    python -m experiments.keskar --model c1 --preset paper --seeds 5   # GPU work

For each seed: train the small-batch (SB) and large-batch (LB) networks from the same initial weights,
each "until the loss function ceased to improve" (a training-loss patience rule within an epoch cap), probing
Adam's preconditioned λ_max every ``probe_every`` epochs (``probes.h5``; it does not change the training);
interpolate between them (α ∈ [−1, 2], 25 points, BatchNorm ``recompute``); compute Keskar's sharpness
(ε = 1e-3 and 5e-4, full space and a random 100-dimensional subspace, BatchNorm ``batch`` as the paper's
Keras code did) and λ_max of both. Writes everything into the run directory — checkpoints, curve, sharpness,
``keskar_<model>.png`` (the curve, and the probed sharpness against its threshold), the per-layer curvature and
a markdown summary beside the paper's Tables 2 and 3 — and copies the figures into ``--figures`` when given.
Every stage is skipped when its output is complete and resumed when it is partial, so an interrupted run continues
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments._pipeline import StageClock, copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core import config as cfg
from minima.core.allocator import cpu_name, keep_freed_memory
from minima.core.config import setting
from minima.core.vocab import BNMode
from minima.curvature.probes import PRECONDITIONED
from minima.files import checkpoint as ckpt_io
from minima.files import results, timeline
from minima.files.naming import unique_labels
from minima.files.rundir import RunDir
from minima.geometry.evaluate import evaluate_checkpoint
from minima.models import available_models, default_data, own_import
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_interpolation
from minima.studies.sharpness import MeasureRequest, block_jobs, measure
from minima.studies.sharpness import result_jobs as measure_jobs
from minima.studies.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

# Keskar et al. (2017), Table 2 (accuracy %, mean ± std over 5 runs) and Table 3 (full-space sharpness).
PAPER = {
    "c1": {"train_acc": ((99.89, 0.02), (99.66, 0.2)), "test_acc": ((80.04, 0.12), (77.26, 0.42)),
           "phi_full_1e-3": ((28.58, 3.13), (707.23, 43.04)), "phi_full_5e-4": ((7.08, 0.88), (227.31, 23.23)),
           "phi_sub_1e-3": ((2.18, 0.23), (137.25, 21.60)), "phi_sub_5e-4": ((0.71, 0.15), (29.50, 7.48))},
    "c2": {"train_acc": ((99.99, 0.04), (99.99, 0.01)), "test_acc": ((89.24, 0.12), (87.26, 0.07)),
           "phi_full_1e-3": ((8.68, 1.32), (925.32, 38.29)), "phi_full_5e-4": ((2.07, 0.86), (175.31, 18.28)),
           "phi_sub_1e-3": ((0.95, 0.34), (25.09, 2.61)), "phi_sub_5e-4": ((0.31, 0.08), (5.82, 0.52))},
}


@dataclass(frozen=True)
class Preset:
    """Every knob of the pipeline, with units; read from ``experiments/configs/pipelines/keskar_<name>.toml`` (or a
    TOML file given by path) over these defaults, and stored in the run directory as ``preset.json``."""

    data: str | None = setting(None, "data source", default_text="$MINIMA_DATA, then the torchvision download")
    train_subset: int | None = setting(None, "stratified training subset for training", unit="samples",
                                       default_text="all")
    test_subset: int | None = setting(None, "stratified test subset", unit="samples", default_text="all")
    model_kwargs: dict = setting(help="model arguments for any model", factory=dict,
                                 default_text="model_kwargs_for[model], else MODEL_DEFAULTS[model], else none")
    model_kwargs_for: dict = setting(help="model arguments per model name, e.g. {mlp = {widths = [16]}}",
                                     factory=dict)
    sb_batch: int = setting(256, "small-batch (SB) size", unit="samples")
    lb_batch: int = setting(5000, "large-batch (LB) size", unit="samples")
    micro_batch: int | None = setting(None, "largest forward batch (gradient accumulation above it)",
                                      unit="samples", default_text="the whole batch")
    lr: float = setting(1e-3, "Adam learning rate (both regimes)")
    epochs: int = setting(100, "epoch cap", unit="epochs")
    patience: int = setting(5, "stop after this many epochs without a training-loss improvement", unit="epochs")
    min_delta: float = setting(1e-4, "smallest training-loss decrease that counts", unit="nats")
    target_loss: float | None = setting(None, "stop at this training loss", unit="nats", default_text="none")
    interp_alphas: str = setting("-1:2:25", "α grid of the SB→LB curve (START:STOP:NUM)")
    interp_train_subset: int | None = setting(None, "training samples per α", unit="samples", default_text="all")
    interp_test_subset: int | None = setting(None, "test samples per α", unit="samples", default_text="all")
    sharpness_samples: int | None = setting(None, "training samples f is defined on for sharpness",
                                            unit="samples", default_text="all")
    eps: tuple[float, ...] = setting((1e-3, 5e-4), "Keskar box sizes ε")
    subspace: int = setting(100, "random subspace dimension p")
    maxiter: int = setting(10, "L-BFGS-B iterations")
    sharpness_bn: BNMode = setting("batch", "BatchNorm inside f for sharpness (the paper's Keras code: batch)")
    eval_batch_size: int = setting(1000, "evaluation batch size", unit="samples")
    seeds: int = setting(1, "independent runs (mean ± std over them)")
    layer_samples: int | None = setting(None, "training images the per-layer curvature and the eigenvalue densities "
                                        "are measured on", unit="samples", default_text="all")
    layer_trace_products: int = setting(12, "Hutch++ products per layer for its Hessian trace", unit="products")
    layer_eig_tol: float = setting(1e-3, "relative residual bound at which each layer's λ_max stops (Lanczos)")
    density_probes: int = setting(2, "probes of each eigenvalue density (SLQ)")
    density_steps: int = setting(30, "Lanczos steps per density probe")
    probe_every: int = setting(1, "Adam's preconditioned λ_max of SB and LB measured during training every K epochs "
                               "(the same count for both regimes; 0: not measured)", unit="epochs")
    probe_samples: int = setting(1000, "training images the training-time λ_max is measured on (stratified, no "
                                 "augmentation, BatchNorm as for sharpness)", unit="samples")


CONFIGS = ROOT / "experiments" / "configs" / "pipelines"
PRESET_NAMES = ("paper", "quick", "smoke")  # experiments/configs/pipelines/keskar_<name>.toml
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"input_shape": [3, 32, 32], "widths": [512, 512, 512], "batchnorm": True},
}


def load_preset(name_or_path: str) -> tuple[str, Preset]:
    """(name, preset) for a preset name (``experiments/configs/pipelines/keskar_<name>.toml``) or a TOML file."""
    return cfg.load_preset(Preset, CONFIGS, "keskar_", name_or_path)


def train_regime(model: str, preset: Preset, batch: int, seed: int, out: Path, ds: data_mod.Dataset) -> Path:
    """The SB (or LB) network of one seed, trained into ``out`` (kept when ``final.pt`` exists, resumed from
    ``last.pt``)."""
    final = out / "final.pt"
    if final.exists():
        return final
    config = TrainConfig(
        model=model, model_kwargs=dict(preset.model_kwargs or preset.model_kwargs_for.get(model)
                                       or MODEL_DEFAULTS.get(model, {})),
        data=data_for(model, preset),
        train_subset=preset.train_subset, test_subset=preset.test_subset, epochs=preset.epochs, batch_size=batch,
        micro_batch=min(preset.micro_batch, batch) if preset.micro_batch else None, optimizer="adam",
        lr=preset.lr, scaling="none", augment=False, seed=seed, init_seed=1337 + seed, patience=preset.patience,
        min_delta=preset.min_delta, target_loss=preset.target_loss, out=str(out),
        eval_batch_size=preset.eval_batch_size,
        # Adam's preconditioned sharpness during training (Cohen et al. 2022): it does not change the training
        probe=(f"{PRECONDITIONED}:{preset.probe_every}epochs",) if preset.probe_every else (),
        probe_subset=min(preset.probe_samples, len(ds.train)), probe_bn_mode=preset.sharpness_bn,
    )
    return train(config, resume=(out / "last.pt").exists(), dataset=ds)


def data_for(model: str, preset: Preset) -> str | None:
    """The preset's data, or the model's own (c3/c4: CIFAR-100) when the preset names none."""
    return preset.data if preset.data is not None else default_data(model)


def _exact_accuracy(path: Path, ds: data_mod.Dataset, batch_size: int, trusted: Sequence[str]) -> dict[str, float]:
    out = {}
    for name, r in evaluate_checkpoint(path, {"train": ds.train, "test": ds.test}, batch_size, trusted).items():
        out[f"{name}_acc"], out[f"{name}_loss"] = 100.0 * r.accuracy, r.loss
    lines = RunDir(path.parent).metrics()
    out["epochs"] = lines[-1]["epoch"]
    out["stopped"] = lines[-1].get("stopped") or f"epoch cap {lines[-1]['epoch']}"
    return out


def _sharpness_complete(path: Path, req: Any) -> bool:
    if not path.exists():
        return False
    have = {(r["checkpoint_label"], r["metric"]) for r in results.load_sharpness(path)}
    model = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(req.checkpoints[0]), req.trust_import)
    want = {(label, name) for label in unique_labels(req.checkpoints)
            for _, name, _ in block_jobs(measure_jobs(req), model, req.blocks, req.curvature)}
    return want <= have


def curvature_requests(model: str, preset: Preset, sb: Path, lb: Path, out: Path) -> list[Any]:
    """Per-layer λ_max and Hessian trace (blocks ``layers``, Hutch++) and the whole network's eigenvalue density of
    SB and LB, with the sharpness stage's BatchNorm mode, into one file."""
    common = dict(checkpoints=[sb, lb], train_subset=preset.layer_samples, bn_mode=preset.sharpness_bn,
                  eval_batch_size=min(preset.eval_batch_size, preset.layer_samples or preset.eval_batch_size),
                  out=out, trust_import=own_import(model))
    return [MeasureRequest(metrics=["hessian", "trace"], topk=1, eig_tol=preset.layer_eig_tol, blocks="layers",
                           trace_method="hutchpp",
                           trace_max_probes=preset.layer_trace_products, **common),
            MeasureRequest(metrics=["density"], density_probes=preset.density_probes,
                           density_steps=preset.density_steps, **common)]


def layer_rows(path: Path) -> dict[str, dict[str, Any]]:
    """``{block: {"params": n, "sb_lambda_max", "lb_lambda_max", "sb_trace", "lb_trace"}}`` from a curvature file,
    blocks in the natural order of their names (``net.2`` before ``net.10``: a sequential model's order)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results.load_sharpness(path):
        metric, regime = str(r["metric"]), r["checkpoint_label"]
        if "@" not in metric:
            continue
        row = rows.setdefault(str(r["block"]), {"params": int(r["block_size"])})
        row[f"{regime}_{'lambda_max' if metric.startswith('hessian') else 'trace'}"] = float(r["value"])

    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return {name: rows[name] for name in sorted(rows, key=natural)}


def run_seed(model: str, preset: Preset, seed: int, out: Path, ds: data_mod.Dataset, clock: StageClock
             ) -> dict[str, Any]:
    """All stages for one seed (each skipped when its output is complete); returns the SB/LB numbers."""
    out.mkdir(parents=True, exist_ok=True)
    for name, batch in (("sb", preset.sb_batch), ("lb", preset.lb_batch)):
        clock.run(f"seed{seed}/train_{name}", (out / name / "final.pt").exists(),
                  lambda b=batch, n=name: train_regime(model, preset, b, seed, out / n, ds))
    sb, lb = out / "sb" / "final.pt", out / "lb" / "final.pt"
    curve_path = out / "sb_vs_lb.h5"
    complete = curve_path.exists() and results.load_curve(curve_path).complete
    clock.run(f"seed{seed}/interpolate", complete, lambda: run_interpolation(SweepRequest(
        checkpoint_a=sb, checkpoint_b=lb, alphas=preset.interp_alphas, bn="recompute",
        train_subset=preset.interp_train_subset, test_subset=preset.interp_test_subset, out=curve_path,
        resume=curve_path.exists(), eval_batch_size=preset.eval_batch_size, trust_import=own_import(model),
    )))
    sharp_path = out / "sharpness.h5"
    request = MeasureRequest(
        checkpoints=[sb, lb], metrics=["keskar", "hessian"], eps=list(preset.eps), subspace=preset.subspace,
        maxiter=preset.maxiter, topk=1, train_subset=preset.sharpness_samples, bn_mode=preset.sharpness_bn,
        eval_batch_size=min(preset.eval_batch_size, preset.sharpness_samples or preset.eval_batch_size),
        out=sharp_path, trust_import=own_import(model),
    )
    clock.run(f"seed{seed}/sharpness", _sharpness_complete(sharp_path, request), lambda: measure(request))
    curv_path = out / "curvature.h5"
    curvature = curvature_requests(model, preset, sb, lb, curv_path)
    clock.run(f"seed{seed}/curvature", all(_sharpness_complete(curv_path, r) for r in curvature),
              lambda: [measure(r) for r in curvature])
    row: dict[str, Any] = {}
    for name, path in (("sb", sb), ("lb", lb)):
        for k, v in _exact_accuracy(path, ds, preset.eval_batch_size, own_import(model)).items():
            row[f"{name}_{k}"] = v
    for r in results.load_sharpness(sharp_path):
        regime = r["checkpoint_label"]
        if r["metric"].startswith("keskar_full"):
            row[f"{regime}_phi_full_{r['eps']:g}"] = float(r["phi"])
        elif r["metric"].startswith("keskar_sub"):
            row[f"{regime}_phi_sub_{r['eps']:g}"] = float(r["phi"])
        elif r["metric"].startswith("hessian"):
            row[f"{regime}_lambda_max"] = float(r["eigenvalues"][0])
    for name in ("sb", "lb"):
        row.update({f"{name}_{k}": v for k, v in probe_row(out / name / "probes.h5").items()})
    row["layers"] = layer_rows(curv_path)
    for r in results.load_sharpness(curv_path):
        if str(r["metric"]).startswith("density"):
            row[f"{r['checkpoint_label']}_density_max"] = float(np.max(r["nodes"]))
    return row


def probe_row(path: Path) -> dict[str, float]:
    """The preconditioned λ_max a regime's training measured (``probes.h5``; none for a run without probes): at
    the end, its largest value, and that value over the stability threshold (2 + 2β₁)/((1 − β₁)η) at its step."""
    if not path.exists():
        return {}
    rows = timeline.load(path).get(PRECONDITIONED)
    if rows is None or not len(rows["value"]):
        return {}
    value, threshold = np.asarray(rows["value"]), np.asarray(rows["threshold"])
    ok = np.isfinite(value)  # NaN before Adam's first step
    return {"precond_final": float(value[-1]), "precond_threshold": float(threshold[-1]),
            "precond_max": float(value[ok].max()), "precond_max_ratio": float(np.max(value[ok] / threshold[ok]))}


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def summary_markdown(model: str, preset_name: str, preset: Preset, rows: list[dict[str, Any]], ds: data_mod.Dataset,
                     compute_s: float, wall_s: float) -> str:
    """The markdown table: our SB/LB numbers (mean ± std over seeds) beside the paper's."""
    paper = PAPER.get(model, {})

    def ours(key: str, regime: str, digits: int = 2) -> str:
        return _fmt([r[f"{regime}_{key}"] for r in rows if f"{regime}_{key}" in r], digits)

    def theirs(key: str, idx: int) -> str:
        if key not in paper:
            return "—"
        m, s = paper[key][idx]
        return f"{m:.2f} ± {s:.2f}"

    eps = [f"{e:g}" for e in preset.eps]
    lines = [
        f"# Keskar et al. (2017) SB vs LB — `{model}`, preset `{preset_name}`",
        "",
        f"Data: {ds.spec.get('kind')} {ds.spec.get('name', 'CIFAR-10-format')} data ({ds.num_classes} classes), "
        f"{len(ds.train)} training / {len(ds.test)} test images "
        f"(stratified subsets: {ds.subsets or 'none'}). SB batch {preset.sb_batch}, LB batch {preset.lb_batch}; Adam "
        f"(lr {preset.lr:g}), no augmentation, same initial weights, trained until the training loss stopped "
        f"improving by {preset.min_delta:g} for {preset.patience} epochs (cap {preset.epochs} epochs). "
        f"Seeds: {len(rows)}. Sharpness: BatchNorm `{preset.sharpness_bn}`, "
        f"{preset.sharpness_samples or len(ds.train)} training samples, L-BFGS-B {preset.maxiter} iterations, "
        f"random subspace p = {preset.subspace}. Machine: {cpu_name()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; compute time {compute_s / 60:.1f} min "
        f"(the stages' times when they ran; this invocation {wall_s / 60:.1f} min).",
        "",
        "| quantity | SB (ours) | LB (ours) | SB (paper) | LB (paper) |",
        "|---|---|---|---|---|",
        f"| train accuracy (%) | {ours('train_acc', 'sb')} | {ours('train_acc', 'lb')} | {theirs('train_acc', 0)} | "
        f"{theirs('train_acc', 1)} |",
        f"| test accuracy (%) | {ours('test_acc', 'sb')} | {ours('test_acc', 'lb')} | {theirs('test_acc', 0)} | "
        f"{theirs('test_acc', 1)} |",
        f"| final training loss | {ours('train_loss', 'sb', 4)} | {ours('train_loss', 'lb', 4)} | — | — |",
        f"| epochs trained | {ours('epochs', 'sb', 0)} | {ours('epochs', 'lb', 0)} | — | — |",
    ]
    for e in eps:
        for space, label in (("full", "full space"), ("sub", f"{preset.subspace}-dim subspace")):
            key = f"phi_{space}_{e}"
            pk = f"phi_{space}_{float(e):.0e}".replace("e-04", "e-4").replace("e-03", "e-3")
            lines.append(f"| φ(ε={e}), {label} | {ours(key, 'sb')} | {ours(key, 'lb')} | {theirs(pk, 0)} | "
                         f"{theirs(pk, 1)} |")
    lines.append(f"| λ_max (Hessian, BN {preset.sharpness_bn}) | {ours('lambda_max', 'sb')} | "
                 f"{ours('lambda_max', 'lb')} | — | — |")
    if any("sb_precond_final" in r for r in rows):
        threshold = rows[0]["sb_precond_threshold"]
        lines += [f"| Adam's preconditioned λ_max at the end of training (threshold 38/η = {threshold:.0f}) | "
                  f"{ours('precond_final', 'sb', 0)} | {ours('precond_final', 'lb', 0)} | — | — |",
                  f"| its largest value during training / threshold | {ours('precond_max_ratio', 'sb', 3)} | "
                  f"{ours('precond_max_ratio', 'lb', 3)} | — | — |"]
    sb_test, lb_test = (np.mean([r[f"{k}_test_acc"] for r in rows]) for k in ("sb", "lb"))
    sb_phi, lb_phi = (np.mean([r[f"{k}_phi_full_{eps[0]}"] for r in rows]) for k in ("sb", "lb"))
    lines += [
        "",
        f"Effect reproduced on this run: LB test accuracy below SB: **{'yes' if lb_test < sb_test else 'no'}** "
        f"({lb_test:.2f} vs {sb_test:.2f} %); LB sharper on φ(ε={eps[0]}): **{'yes' if lb_phi > sb_phi else 'no'}** "
        f"({lb_phi:.1f} vs {sb_phi:.1f}).",
        "Stopping: " + "; ".join(f"seed {i}: SB {r['sb_stopped']}, LB {r['lb_stopped']}" for i, r in enumerate(rows)),
    ]
    if any("sb_precond_final" in r for r in rows):
        lines += [
            "",
            f"During training (every {preset.probe_every} epoch(s) and after the last step, on "
            f"{min(preset.probe_samples, len(ds.train))} training images, BatchNorm `{preset.sharpness_bn}`): Adam's "
            "preconditioned sharpness λ_max(P^-1/2 H P^-1/2), P = diag(√v̂_t) + ε (Cohen et al. 2022), against its "
            "stability threshold (2 + 2β₁)/((1 − β₁)η) = 38/η; drawn in the right panel of `keskar_<model>.png`. "
            "Both regimes share η here, hence one threshold; under the linear scaling rule LB's larger η would lower "
            "its own.",
        ]
    layers = rows[0].get("layers") or {}
    if layers:
        lines += [
            "",
            f"Per layer (seed 0; BatchNorm `{preset.sharpness_bn}`, {preset.layer_samples or len(ds.train)} training "
            "images): λ_max by Lanczos on each layer's diagonal Hessian block (a weight with its bias, a BatchNorm "
            f"scale with its shift), its trace by Hutch++ ({preset.layer_trace_products} products). The eigenvalue "
            f"densities (SLQ, {preset.density_probes} probes × {preset.density_steps} steps) are in "
            f"`keskar_<model>_curvature.png`; their largest Ritz values: SB {rows[0].get('sb_density_max', 0):.4g}, "
            f"LB {rows[0].get('lb_density_max', 0):.4g}.",
            "",
            "| layer (parameters) | SB λ_max | LB λ_max | SB trace | LB trace |",
            "|---|---|---|---|---|",
            *(f"| {name} ({v['params']:,}) | {v.get('sb_lambda_max', float('nan')):.4g} | "
              f"{v.get('lb_lambda_max', float('nan')):.4g} | {v.get('sb_trace', float('nan')):.4g} | "
              f"{v.get('lb_trace', float('nan')):.4g} |" for name, v in layers.items()),
        ]
    return "\n".join(lines) + "\n"


def sb_lb_figure(seed_dir: Path, out: Path) -> Path:
    """The SB→LB curve; beside it, when both regimes were probed during training, their preconditioned λ_max per
    epoch with each run's stability threshold (from its own learning rate at each probe)."""
    from matplotlib.figure import Figure

    from minima.figures import plot_curve, plot_probe_runs

    lines = {name.upper(): timeline.load(seed_dir / name / "probes.h5") for name in ("sb", "lb")
             if (seed_dir / name / "probes.h5").exists()}
    probed = len(lines) == 2 and all(PRECONDITIONED in line for line in lines.values())
    # the curve's two-line title needs its panel ≈ 7 inches wide
    fig = Figure(figsize=(14.5, 5.0) if probed else (7.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=(1.25, 1)) if probed else [fig.add_subplot()]
    plot_curve(results.load_curve(seed_dir / "sb_vs_lb.h5"), ax=axes[0])
    if probed:
        attrs = next(iter(lines.values()))["_attrs"]
        subset = json.loads(attrs["subset"])
        plot_probe_runs(lines, PRECONDITIONED, axes[1], x="epoch")
        axes[1].set_ylabel("λ_max of P^-1/2 H P^-1/2 (Adam)")
        axes[1].set_title(f"Adam's preconditioned sharpness during training, {seed_dir.name}\n{subset['n']} training "
                          f"images, BatchNorm {attrs['bn_mode']}; dashed: its threshold (2 + 2β₁)/((1 − β₁)η)",
                          fontsize=9)
    fig.savefig(out, dpi=130)
    return out


def curvature_figure(path: Path, out: Path, title: str) -> Path:
    """Left: λ_max of every layer's Hessian block, SB beside LB (log scale); right: the two eigenvalue densities."""
    from matplotlib.figure import Figure

    from minima.figures import plot_density

    rows = layer_rows(path)
    order = {"sb": 0, "lb": 1}  # SB first: the same colours as the bars
    densities = sorted((r for r in results.load_sharpness(path) if str(r["metric"]).startswith("density")),
                       key=lambda r: order.get(r["checkpoint_label"], 2))
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    labels = list(rows)
    where = np.arange(len(labels))
    for k, regime in enumerate(("sb", "lb")):
        left.bar(where + (k - 0.5) * 0.4, [rows[b].get(f"{regime}_lambda_max", np.nan) for b in labels], 0.4,
                 label=regime.upper(), color=f"C{k}")
    left.set_yscale("log")
    left.set_xticks(where, [f"{b}\n({rows[b]['params']:,})" for b in labels], fontsize=7)
    left.set(ylabel="λ_max of the layer's Hessian block", title="per layer (parameters)")
    left.legend(fontsize=8)
    if densities:
        plot_density(densities, right)
    fig.suptitle(f"Curvature of SB and LB — {title}", fontsize=9)
    fig.savefig(out, dpi=130)
    return out


def parse_summary_table(markdown: str) -> dict[str, list[str]]:
    """The rows of a summary table: {quantity: [SB ours, LB ours, SB paper, LB paper]}."""
    table = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| quantity") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            table[cells[0]] = cells[1:]
    return table


@interruptible("keskar")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.keskar", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp",
                   help=f"network: one of {available_models()}, torchvision:NAME or package.module:factory (your own; "
                        "naming it allows importing it) (default: mlp)")
    p.add_argument("--preset", default="quick",
                   help=f"{', '.join(PRESET_NAMES)} (experiments/configs/pipelines/keskar_<name>.toml) or a TOML "
                        "file's path (default: quick)")
    p.add_argument("--seeds", type=int, default=None, help="independent runs (default: the preset's; paper 5)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/keskar_<model>_<preset>)")
    p.add_argument("--figures", type=Path, default=None,
                   help="also copy the figure into this directory, e.g. figures (default: the run directory only)")
    p.add_argument("--data", default=None, help="override the preset's data source (synthetic, torchvision:NAME, "
                   "imagefolder:PATH, npz:PATH or a path)")
    p.add_argument("--data-root", default=None, help="directory of torchvision data sets (default: ~/.cache/minima)")
    args = p.parse_args(argv)
    try:
        preset_name, preset = load_preset(args.preset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.keskar] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    if args.data is not None:
        preset = replace(preset, data=args.data)
    tag = args.model.replace(":", "-")  # a file-name form of the model's name
    out = args.out or Path("runs") / f"keskar_{tag}_{preset_name}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        ds = data_mod.load_source(data_for(args.model, preset), preset.train_subset, preset.test_subset,
                                  root=args.data_root)
        ds = ds.subset(preset.train_subset, preset.test_subset, seed=0)  # a subset larger than the data is refused
    except data_mod.DataError as exc:
        print(f"[experiments.keskar] error: {exc}", file=sys.stderr)
        return 2
    (out / "preset.json").write_text(json.dumps({"model": args.model, "preset": preset_name, **cfg.to_dict(preset)},
                                                indent=2) + "\n")
    seeds = args.seeds if args.seeds is not None else preset.seeds
    # train SB, train LB, interpolate, sharpness, per-layer curvature and densities
    clock = StageClock("keskar", 5 * seeds, out / "stage_seconds.json")
    try:
        rows = [run_seed(args.model, preset, s, out / f"seed{s}", ds, clock) for s in range(seeds)]
    except (ValueError, OSError) as exc:  # bad model/data/settings: one line; finished stages stay on disk
        print(f"[experiments.keskar] error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    md = summary_markdown(args.model, preset_name, preset, rows, ds, clock.total, wall)
    write_summary(out, md, rows)
    fig = sb_lb_figure(out / "seed0", out / f"keskar_{tag}.png")
    curv = curvature_figure(out / "seed0" / "curvature.h5", out / f"keskar_{tag}_curvature.png",
                            f"{args.model}, preset {preset_name}, seed 0")
    fig, curv = copy_figures([fig, curv], args.figures)
    print(md)
    print(f"[experiments.keskar] wrote {out / 'summary.md'}, {fig} and {curv}; this invocation {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
