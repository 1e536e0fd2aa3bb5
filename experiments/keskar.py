"""Keskar et al. (2017) end to end: SB vs LB training, the parametric plot, sharpness, a summary beside the paper.

    python -m experiments.keskar --model mlp --preset quick            # 6–13 min on 2 CPU cores
    python -m experiments.keskar --model c1 --preset paper --seeds 5   # GPU work
    python -m experiments.keskar --preset quick train.lr=5e-4 --dry-run  # the plan and its estimate, nothing run

For each seed: train the small-batch (SB) and large-batch (LB) networks from the same initial weights,
each "until the loss function ceased to improve" (a training-loss patience rule within an epoch cap), probing
Adam's preconditioned λ_max every ``probe_every`` epochs (``probes.h5``; it does not change the training);
interpolate between them (α ∈ [−1, 2], 25 points, BatchNorm ``recompute``); compute Keskar's sharpness
(ε = 1e-3 and 5e-4, full space and a random 100-dimensional subspace, BatchNorm ``batch`` as the paper's
Keras code did) and λ_max of both; evaluate both exactly once (``evaluation.json``). Writes everything into the run
directory — checkpoints, curve, sharpness, ``keskar_<model>.png`` (the curve, and the probed sharpness against its
threshold), the per-layer curvature and a markdown summary beside the paper's Tables 2 and 3 — and copies the
figures into ``--figures`` when given.

The preset is a nested request (:mod:`minima.pipelines.declared`): ``[train]`` is ``minima.train``'s request,
``[line]`` ``minima.interpolate``'s, ``[sharpness]`` and ``[curvature]`` ``minima.sharpness``'s, each over this
pipeline's protocol (:data:`SPEC`); ``KEY=VALUE`` arguments override any of them. The pipeline is a list of stages
(:mod:`minima.pipelines.stages`), six per seed: each is skipped when its output is complete and resumed when it is
partial, so an interrupted run continues where it stopped and a complete one only redraws the summary;
``--shard K/N`` runs the seeds of shard K; ``--dry-run`` prints the plan and its estimate.
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
from minima.curvature.probes import PRECONDITIONED
from minima.files import results, timeline
from minima.files.naming import natural_key
from minima.files.rundir import RunDir
from minima.models import available_models, build_model, default_data, own_import
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.runs import evaluate_run
from minima.pipelines.stages import Rates, Stage
from minima.studies.grid import parse_axis
from minima.studies.interpolate import SweepRequest
from minima.studies.interpolate import run as run_interpolation
from minima.studies.sharpness import block_jobs, measure, measure_request_type, recorded, result_jobs
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
class Keskar:
    """The pipeline's own settings (the top level of its preset; everything else is a table of a library request)."""

    seeds: int = setting(1, "independent runs (mean ± std over them); seed s trains with seed s, init seed 1337 + s")
    sb_batch: int = setting(256, "small-batch (SB) size", unit="samples")
    lb_batch: int = setting(5000, "large-batch (LB) size", unit="samples")
    model_kwargs_for: dict = setting(help="model arguments per model name, e.g. {mlp = {widths = [16]}}, used when "
                                     "[train] model_kwargs is empty", factory=dict)
    probe_every: int = setting(1, "Adam's preconditioned λ_max of SB and LB measured during training every K epochs "
                               "(0: not measured); on [train] probe_subset images, BatchNorm [train] probe_bn_mode",
                               unit="epochs")


PER_RUN = frozenset({"checkpoints", "out", "trust_import", "metrics"})
SPEC = Spec("keskar", Keskar, {
    # Keskar et al.: Adam, no augmentation, "until the loss function ceased to improve" (patience within a cap)
    "train": Section(TrainConfig, {"optimizer": "adam", "lr": 1e-3, "scaling": "none", "augment": False,
                                   "epochs": 100, "patience": 5, "min_delta": 1e-4, "eval_batch_size": 1000,
                                   "probe_subset": 1000, "probe_bn_mode": "batch"},
                     frozenset({"model", "batch_size", "seed", "init_seed", "out", "probe"}),
                     "SB and LB training (minima.train)"),
    # the parametric plot: α ∈ [−1, 2], 25 points, BatchNorm statistics re-estimated at every point
    "line": Section(SweepRequest, {"alphas": "-1:2:25", "bn": "recompute", "eval_batch_size": 1000},
                    frozenset({"checkpoint_a", "checkpoint_b", "out", "resume", "trust_import"}),
                    "the SB → LB line (minima.interpolate)"),
    # Keskar's sharpness, BatchNorm in batch mode as the paper's Keras code, and λ_max
    "sharpness": Section(measure_request_type(), {"metrics": ["keskar", "hessian"], "eps": (1e-3, 5e-4),
                                                  "subspace": 100, "maxiter": 10, "topk": 1, "bn_mode": "batch",
                                                  "eval_batch_size": 1000}, PER_RUN,
                         "Keskar's φ and λ_max of SB and LB (minima.sharpness)"),
    # per-layer λ_max (Lanczos) and trace (Hutch++), and the eigenvalue densities (SLQ)
    "curvature": Section(measure_request_type(), {"bn_mode": "batch", "eig_tol": 1e-3, "trace_max_probes": 12,
                                                  "density_probes": 2, "density_steps": 30, "eval_batch_size": 1000},
                         PER_RUN | {"blocks", "topk", "trace_method"},
                         "per-layer curvature and densities of SB and LB (minima.sharpness)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"input_shape": [3, 32, 32], "widths": [512, 512, 512], "batchnorm": True},
}
REGIMES = ("sb", "lb")


def load_preset(name_or_path: str, overrides: Sequence[str] = ()) -> Declared:
    """A Keskar preset (``experiments/configs/pipelines/keskar_<name>.toml`` or a TOML file) with overrides."""
    return PIPELINE.load(name_or_path, overrides)


def model_kwargs(model: str, p: Declared) -> dict[str, Any]:
    """[train] model_kwargs, else the preset's ``model_kwargs_for[model]``, else :data:`MODEL_DEFAULTS`."""
    return dict(p.values("train").get("model_kwargs") or p.own.model_kwargs_for.get(model)
                or MODEL_DEFAULTS.get(model, {}))


def data_for(model: str, p: Declared) -> str | None:
    """The preset's data, or the model's own (c3/c4: CIFAR-100) when the preset names none."""
    data = p.values("train").get("data")
    return data if data is not None else default_data(model)


def load_data(model: str, p: Declared, root: str | None = None) -> data_mod.Dataset:
    """The training data of both regimes (a subset larger than the data is refused)."""
    t = p.values("train")
    ds = data_mod.load_source(data_for(model, p), root=root)
    return ds.subset(t.get("train_subset"), t.get("test_subset"), seed=0)


def train_config(model: str, p: Declared, regime: str, seed: int, out: Path, train_images: int) -> TrainConfig:
    """The SB (or LB) training request of one seed: the [train] table with this regime's batch size, the seed, the
    shared initial weights (init seed 1337 + seed) and the probe."""
    t = p.values("train")
    batch = p.own.sb_batch if regime == "sb" else p.own.lb_batch
    micro = t.get("micro_batch")
    return p.request("train", model=model, model_kwargs=model_kwargs(model, p), data=data_for(model, p),
                     batch_size=batch, micro_batch=min(micro, batch) if micro else None, seed=seed,
                     init_seed=1337 + seed, out=str(out),
                     # Adam's preconditioned sharpness during training (Cohen et al. 2022): it does not change the
                     # training
                     probe=(f"{PRECONDITIONED}:{p.own.probe_every}epochs",) if p.own.probe_every else (),
                     probe_subset=min(t.get("probe_subset", 1000), train_images))


def _small_batch(values: Any) -> int:
    """A measurement's evaluation batch: no larger than its training subset."""
    n = values.get("train_subset")
    return min(values["eval_batch_size"], n or values["eval_batch_size"])


def sharpness_request(model: str, p: Declared, sb: Path, lb: Path, out: Path) -> Any:
    """Keskar's φ and λ_max of SB and LB into one file."""
    return p.request("sharpness", checkpoints=[sb, lb], out=out, trust_import=own_import(model),
                     eval_batch_size=_small_batch(p.values("sharpness")))


def curvature_requests(model: str, p: Declared, sb: Path, lb: Path, out: Path) -> list[Any]:
    """Per-layer λ_max and Hessian trace (blocks ``layers``, Hutch++) and the whole network's eigenvalue density of
    SB and LB, into one file."""
    common = dict(checkpoints=[sb, lb], out=out, trust_import=own_import(model),
                  eval_batch_size=_small_batch(p.values("curvature")))
    return [p.request("curvature", metrics=["hessian", "trace"], topk=1, blocks="layers", trace_method="hutchpp",
                      **common),
            p.request("curvature", metrics=["density"], **common)]


def stages(model: str, p: Declared, out: Path, data: Callable[[], data_mod.Dataset],
           data_root: str | None = None) -> list[Stage]:
    """The pipeline's stages, six per seed (group ``seed<s>``): train SB, train LB, the line, sharpness, curvature,
    the exact evaluation of both. ``data()`` loads the training data (once, when a stage first needs it);
    ``data_root``: where torchvision data sets are (the evaluation reloads the data its checkpoints record)."""
    out_stages: list[Stage] = []
    for seed in range(p.own.seeds):
        out_stages += seed_stages(model, p, seed, out / f"seed{seed}", data, data_root)
    return out_stages


def training_stages(model: str, p: Declared, seed: int, seed_dir: Path, data: Callable[[], data_mod.Dataset]
                    ) -> list[Stage]:
    """The SB and LB training stages of one seed (also the stages other pipelines need Keskar's minima from)."""
    out = []
    for regime in REGIMES:
        d = seed_dir / regime

        def run(regime: str = regime, d: Path = d) -> Path:
            ds = data()
            return train(train_config(model, p, regime, seed, d, len(ds.train)), resume=(d / "last.pt").exists(),
                         dataset=ds)

        def estimate(r: Rates, regime: str = regime) -> float:
            ds = data()
            return r.training(p.values("train")["epochs"], len(ds.train), len(ds.test))

        out.append(Stage(f"{seed_dir.name}/train_{regime}", seed_dir.name, (d / "final.pt").exists, run, estimate))
    return out


def seed_stages(model: str, p: Declared, seed: int, out: Path, data: Callable[[], data_mod.Dataset],
                data_root: str | None = None) -> list[Stage]:
    group = out.name
    trained = training_stages(model, p, seed, out, data)
    sb, lb = out / "sb" / "final.pt", out / "lb" / "final.pt"
    curve_path, sharp_path, curv_path = out / "sb_vs_lb.h5", out / "sharpness.h5", out / "curvature.h5"
    line = p.values("line")
    sharp = sharpness_request(model, p, sb, lb, sharp_path)
    curvature = curvature_requests(model, p, sb, lb, curv_path)
    needs = tuple(s.name for s in trained)

    def interpolate() -> Any:
        return run_interpolation(p.request("line", checkpoint_a=sb, checkpoint_b=lb, out=curve_path,
                                           resume=curve_path.exists(), trust_import=own_import(model)))

    def line_estimate(r: Rates) -> float:
        ds = data()
        n_train, n_test = line.get("train_subset") or len(ds.train), line.get("test_subset") or len(ds.test)
        return r.grid(len(parse_axis(line["alphas"])), 2 * n_train + n_test)

    def measure_estimate(requests: Sequence[Any]) -> Callable[[Rates], float]:
        def seconds(r: Rates) -> float:
            ds = data()
            net = build_model(model, ds.num_classes, trusted=own_import(model), **model_kwargs(model, p))
            total = 0.0
            for req in requests:
                n = req.train_subset or len(ds.train)
                for metric, _, job in block_jobs(result_jobs(req), net, req.blocks, req.curvature):
                    if metric.cost is not None:
                        total += len(REGIMES) * r.measurement(metric.cost(job), n)
            return total
        return seconds

    def evaluate_both() -> None:
        for regime in REGIMES:
            evaluate_run(out / regime, own_import(model), p.values("train")["eval_batch_size"], data_root)

    def evaluate_estimate(r: Rates) -> float:
        ds = data()
        return len(REGIMES) * r.grid(1, len(ds.train) + len(ds.test))

    return [
        *trained,
        Stage(f"{group}/interpolate", group, lambda: curve_path.exists() and results.load_curve(curve_path).complete,
              interpolate, line_estimate, needs),
        Stage(f"{group}/sharpness", group, lambda: recorded(sharp), lambda: measure(sharp),
              measure_estimate([sharp]), needs),
        Stage(f"{group}/curvature", group, lambda: all(recorded(r) for r in curvature),
              lambda: [measure(r) for r in curvature], measure_estimate(curvature), needs),
        Stage(f"{group}/evaluate", group, lambda: all((out / r / "evaluation.json").exists() for r in REGIMES),
              evaluate_both, evaluate_estimate, needs),
    ]


def rates(model: str, p: Declared, data: Callable[[], data_mod.Dataset]) -> Rates:
    """The network's measured seconds per image (the unit of the estimate), at the SB batch size."""
    ds = data()
    return Rates.for_network(model, model_kwargs(model, p), ds.num_classes, ds.image_shape,
                             batch=min(p.own.sb_batch, 256), keskar=True)


def seed_row(model: str, out: Path) -> dict[str, Any]:
    """One seed's SB/LB numbers, from the files its stages wrote (nothing is computed)."""
    row: dict[str, Any] = {}
    for name in REGIMES:
        found = json.loads((out / name / "evaluation.json").read_text())
        for split in ("train", "test"):
            row[f"{name}_{split}_acc"], row[f"{name}_{split}_loss"] = (100.0 * found[f"{split}_accuracy"],
                                                                      found[f"{split}_loss"])
        lines = RunDir(out / name).metrics()
        row[f"{name}_epochs"] = lines[-1]["epoch"]
        row[f"{name}_stopped"] = lines[-1].get("stopped") or f"epoch cap {lines[-1]['epoch']}"
    for r in results.load_sharpness(out / "sharpness.h5"):
        regime = r["checkpoint_label"]
        if r["metric"].startswith("keskar_full"):
            row[f"{regime}_phi_full_{r['eps']:g}"] = float(r["phi"])
        elif r["metric"].startswith("keskar_sub"):
            row[f"{regime}_phi_sub_{r['eps']:g}"] = float(r["phi"])
        elif r["metric"].startswith("hessian"):
            row[f"{regime}_lambda_max"] = float(r["eigenvalues"][0])
    for name in REGIMES:
        row.update({f"{name}_{k}": v for k, v in probe_row(out / name / "probes.h5").items()})
    curv_path = out / "curvature.h5"
    row["layers"] = layer_rows(curv_path)
    for r in results.load_sharpness(curv_path):
        if str(r["metric"]).startswith("density"):
            row[f"{r['checkpoint_label']}_density_max"] = float(np.max(r["nodes"]))
    return row


def layer_rows(path: Path) -> dict[str, dict[str, Any]]:
    """``{block: {"params": n, "sb_lambda_max", "lb_lambda_max", "sb_trace", "lb_trace"}}`` from a curvature file,
    blocks in the natural order of their names (``net.2`` before ``net.10``: a sequential model's order)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results.load_sharpness(path):
        metric, regime = str(r["metric"]), r["checkpoint_label"]
        if "@" not in metric:
            continue
        row = rows.setdefault(str(r["block"]), {"params": int(r["block_size"]), "modules": r.get("block_modules")})
        row[f"{regime}_{'lambda_max' if metric.startswith('hessian') else 'trace'}"] = float(r["value"])

    return {name: rows[name] for name in sorted(rows, key=natural_key)}


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


def accuracy_verdict(sb: list[float], lb: list[float], test_images: int) -> str:
    """Whether LB's test accuracy (%) is below SB's, with the standard error of the difference: across seeds when
    there are several (the seeds' spread), else binomial over the test images (√(p(1 − p)/n) for each); "not
    distinguishable" when the difference is within 2 standard errors."""
    diff, se, how = accuracy_difference(sb, lb, test_images)
    answer = "not distinguishable" if within_noise(diff, se) else "yes" if diff > 0 else "no (LB above SB)"
    return (f"LB test accuracy below SB: **{answer}** ({np.mean(lb):.2f} vs {np.mean(sb):.2f} %, difference "
            f"{diff:.2f} ± {se:.2f} points, {how})")


def summary_markdown(model: str, preset_name: str, p: Declared, rows: list[dict[str, Any]], ds: data_mod.Dataset,
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

    t, s, c = p.values("train"), p.values("sharpness"), p.values("curvature")
    eps = [f"{e:g}" for e in s["eps"]]
    lines = [
        f"# Keskar et al. (2017) SB vs LB — `{model}`, preset `{preset_name}`",
        "",
        f"Data: {ds.spec.get('kind')} {ds.spec.get('name', 'CIFAR-10-format')} data ({ds.num_classes} classes), "
        f"{len(ds.train)} training / {len(ds.test)} test images "
        f"(stratified subsets: {ds.subsets or 'none'}). SB batch {p.own.sb_batch}, LB batch {p.own.lb_batch}; "
        f"{t['optimizer'].capitalize()} (lr {t['lr']:g}), {'' if t['augment'] else 'no '}augmentation, same initial "
        f"weights, trained until the training loss stopped "
        f"improving by {t['min_delta']:g} for {t['patience']} epochs (cap {t['epochs']} epochs). "
        f"Seeds: {len(rows)}. Sharpness: BatchNorm `{s['bn_mode']}`, "
        f"{s.get('train_subset') or len(ds.train)} training samples, L-BFGS-B {s['maxiter']} iterations, "
        f"random subspace p = {s['subspace']}. Machine: {cpu_name()}, "
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
        for space, label in (("full", "full space"), ("sub", f"{s['subspace']}-dim subspace")):
            key = f"phi_{space}_{e}"
            pk = f"phi_{space}_{float(e):.0e}".replace("e-04", "e-4").replace("e-03", "e-3")
            lines.append(f"| φ(ε={e}), {label} | {ours(key, 'sb')} | {ours(key, 'lb')} | {theirs(pk, 0)} | "
                         f"{theirs(pk, 1)} |")
    lines.append(f"| λ_max (Hessian, BN {s['bn_mode']}) | {ours('lambda_max', 'sb')} | "
                 f"{ours('lambda_max', 'lb')} | — | — |")
    if any("sb_precond_final" in r for r in rows):
        threshold = rows[0]["sb_precond_threshold"]
        lines += [f"| Adam's preconditioned λ_max at the end of training (threshold 38/η = {threshold:.0f}) | "
                  f"{ours('precond_final', 'sb', 0)} | {ours('precond_final', 'lb', 0)} | — | — |",
                  f"| its largest value during training / threshold | {ours('precond_max_ratio', 'sb', 3)} | "
                  f"{ours('precond_max_ratio', 'lb', 3)} | — | — |"]
    sb_phi, lb_phi = (np.mean([r[f"{k}_phi_full_{eps[0]}"] for r in rows]) for k in ("sb", "lb"))
    lines += [
        "",
        "Effect on this run: " + accuracy_verdict([r["sb_test_acc"] for r in rows], [r["lb_test_acc"] for r in rows],
                                                  len(ds.test))
        + f"; LB sharper on φ(ε={eps[0]}): **{'yes' if lb_phi > sb_phi else 'no'}** ({lb_phi:.1f} vs {sb_phi:.1f}"
        + (", one seed: no error bar)." if len(rows) == 1 else f", means over {len(rows)} seeds)."),
        "Stopping: " + "; ".join(f"seed {i}: SB {r['sb_stopped']}, LB {r['lb_stopped']}" for i, r in enumerate(rows)),
    ]
    if any("sb_precond_final" in r for r in rows):
        lines += [
            "",
            f"During training (every {p.own.probe_every} epoch(s) and after the last step, on "
            f"{min(t['probe_subset'], len(ds.train))} training images, BatchNorm `{t['probe_bn_mode']}`): Adam's "
            "preconditioned sharpness λ_max(P^-1/2 H P^-1/2), P = diag(√v̂_t) + ε (Cohen et al. 2022), against its "
            "stability threshold (2 + 2β₁)/((1 − β₁)η) = 38/η; drawn in the right panel of `keskar_<model>.png`. "
            "Both regimes share η here, hence one threshold; under the linear scaling rule LB's larger η would lower "
            "its own.",
        ]
    layers = rows[0].get("layers") or {}
    if layers:
        lines += [
            "",
            f"Per layer (seed 0; BatchNorm `{c['bn_mode']}`, {c.get('train_subset') or len(ds.train)} training "
            "images): λ_max by Lanczos on each layer's diagonal Hessian block (a weight with its bias, a BatchNorm "
            f"scale with its shift), its trace by Hutch++ ({c['trace_max_probes']} products). The eigenvalue "
            f"densities (SLQ, {c['density_probes']} probes × {c['density_steps']} steps) are in "
            f"`keskar_<model>_curvature.png`; their largest Ritz values: SB {rows[0].get('sb_density_max', 0):.4g}, "
            f"LB {rows[0].get('lb_density_max', 0):.4g}.",
            "",
            "| layer (parameters) | SB λ_max | LB λ_max | SB trace | LB trace |",
            "|---|---|---|---|---|",
            *(f"| {name}{' · ' + v['modules'] if v.get('modules') else ''} ({v['params']:,}) | "
              f"{v.get('sb_lambda_max', float('nan')):.4g} | "
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
        axes[1].set_ylabel("λ_max of P⁻¹ᐟ²HP⁻¹ᐟ² (Adam)")
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
    # the module on two lines ("Linear" over "3072→512"): neighbouring labels stay clear of each other
    left.set_xticks(where, [f"{b}\n{(rows[b]['modules'] or '').replace(' ', chr(10), 1)}\n({rows[b]['params']:,})"
                            for b in labels], fontsize=7)
    left.set_ylabel("λ_max of the layer's Hessian block")
    left.set_title("per layer: its module (parameters)", fontsize=9)
    left.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2, frameon=False)  # off the bars
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
    p = PIPELINE.parser(__doc__)
    p.add_argument("--model", default="mlp",
                   help=f"network: one of {available_models()}, torchvision:NAME or package.module:factory (your own; "
                        "naming it allows importing it) (default: mlp)")
    p.add_argument("--seeds", type=int, default=None, help="independent runs: the same as seeds=N (default: the "
                   "preset's; paper 5)")
    p.add_argument("--data", default=None, help="the data source: the same as train.data=SOURCE (synthetic, "
                   "torchvision:NAME, imagefolder:PATH, npz:PATH or a path)")
    p.add_argument("--data-root", default=None, help="directory of torchvision data sets (default: ~/.cache/minima)")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"seeds={args.seeds}"] if args.seeds is not None else []) + (
        [f"train.data={args.data}"] if args.data is not None else [])
    try:
        preset = load_preset(args.preset, overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.keskar] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    tag = args.model.replace(":", "-")  # a file-name form of the model's name
    out = args.out or Path("runs") / f"keskar_{tag}_{preset.name}"
    t0 = time.perf_counter()
    data = functools.cache(lambda: load_data(args.model, preset, args.data_root))
    try:
        data()  # a bad source or subset is refused before the first stage
        plan_ = stages(args.model, preset, out, data, args.data_root)
        runner = PIPELINE.execute(plan_, out, args, lambda: rates(args.model, preset, data),
                                  {"model": args.model, **preset.to_dict()})
    except (ValueError, OSError, data_mod.DataError) as exc:  # bad model/data/settings: one line; stages kept
        print(f"[experiments.keskar] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    rows = [seed_row(args.model, out / f"seed{s}") for s in range(preset.own.seeds)]
    wall = time.perf_counter() - t0
    md = summary_markdown(args.model, preset.name, preset, rows, data(), runner.total, wall)
    write_summary(out, md, rows)
    fig = sb_lb_figure(out / "seed0", out / f"keskar_{tag}.png")
    curv = curvature_figure(out / "seed0" / "curvature.h5", out / f"keskar_{tag}_curvature.png",
                            f"{args.model}, preset {preset.name}, seed 0")
    fig, curv = copy_figures([fig, curv], args.figures)
    print(md)
    print(f"[experiments.keskar] wrote {out / 'summary.md'}, {fig} and {curv}; this invocation {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
