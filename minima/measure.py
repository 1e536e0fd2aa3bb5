"""Measurement study: sharpness and curvature metrics of checkpoints into an HDF5 file.

Each (checkpoint, result) pair is stored under ``sharpness/<label>/<result>`` with its parameters as attributes
as soon as it finishes, so a killed run resumes by skipping finished pairs; a pair computed with other settings
(another resume key, :func:`minima.config.resume_key`) is recomputed. Which metrics exist, their parameters and
their result names come from the registry :mod:`minima.metrics`; :class:`MeasureRequest` has one field per
registered parameter besides the common ones. Under ``torchrun`` every rank holds a shard of the data, gradients
and Hessian-vector products are sum-reduced, and every rank runs the same optimiser/Lanczos iterations on
identical reduced values; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minima import checkpoint as ckpt_io
from minima import data as data_mod
from minima import distributed, results
from minima.allocator import memory_budget
from minima.config import resume_key, setting, to_dict
from minima.metrics import REGISTRY, Metric, all_params, get_metric
from minima.objective import DatasetObjective, FixedBatches
from minima.precision import Float32Math, float32_math
from minima.precision import effective as precision_effective
from minima.vocab import TORCH_DTYPES, BNMode, CurvatureDtype, DeviceName, check_choice

_COMMON: list[tuple[str, Any, Any]] = [
    ("checkpoints", list[Path], setting(help="checkpoints to measure", positional=True)),
    ("metrics", tuple[str, ...], setting(("keskar",), "metrics to compute (names, or one comma-separated list): "
                                         + ", ".join(f"{m.name} — {m.summary}" for m in REGISTRY.values()))),
    ("samples", int | None, setting(None, "stratified training subset f is defined on", unit="samples",
                                    default_text="all")),
    ("subset_seed", int, setting(0, "seed of the stratified subset")),
    ("trust_import", tuple[str, ...], setting((), "modules a checkpoint's import-path model may be imported from "
                                              "(package.module; also $MINIMA_TRUSTED_IMPORTS)", default_text="none")),
    ("data_root", str | None, setting(None, "directory of torchvision data sets", default_text="~/.cache/minima")),
    ("data", str | None, setting(None, "data: an .npz file, a torchvision CIFAR-10 root or 'synthetic'",
                                 default_text="the data recorded in each checkpoint")),
    ("bn", BNMode, setting("eval", "BatchNorm inside f: eval (running statistics) or batch (each fixed batch's "
                                   "statistics, as Keskar's Keras code)")),
    ("batch_size", int, setting(1000, "fixed evaluation batch size", unit="samples")),
    ("dtype", CurvatureDtype, setting("float32", "precision of the network; sums are float64")),
    ("device", DeviceName, setting("auto", "compute device")),
    ("float32_math", Float32Math, setting("fp32", "float32 matmuls/convolutions on CUDA: fp32 (TF32 off), tf32 or "
                                                  "default (PyTorch's flags); recorded with every result")),
    ("out", Path | None, setting(None, "output .h5 file (a curve file is accepted too: results go under "
                                       "sharpness/)", default_text="<checkpoint>_sharpness.h5 or sharpness.h5 here")),
    ("seed", int, setting(0, "seed of Lanczos start vectors, probes and noise")),
    ("hvp_cache_gb", float | None, setting(None, "memory for gradient graphs kept between Hessian-vector products "
                                                 "at one θ (0 keeps none; the numbers are the same)", unit="GB",
                                           default_text="a quarter of the available memory")),
]


def _metric_field(p: Any) -> tuple[str, Any, Any]:
    return p.name, p.type, setting(p.default, p.help, unit=p.unit, default_text=p.default_text)


MeasureRequest = dataclasses.make_dataclass(
    "MeasureRequest", [*_COMMON, *(_metric_field(p) for p in all_params())], frozen=True)
MeasureRequest.__module__ = __name__
MeasureRequest.__doc__ = ("What to measure on which checkpoints, and how: the common fields plus every registered "
                          "metric's parameters (minima.metrics). Every field is stored with the results.")


def metric_names(requested: Sequence[str]) -> list[Metric]:
    """The registered metrics named in ``requested`` (entries may be comma-separated lists); unknown names are
    an error listing the choices."""
    names = [n.strip() for item in requested for n in str(item).split(",") if n.strip()]
    if not names:
        raise ValueError(f"give at least one metric; choose from {sorted(REGISTRY)}")
    return [get_metric(n) for n in names]


def result_jobs(req: Any) -> list[tuple[Metric, str, dict[str, Any]]]:
    """(metric, result name, parameters) in the order they run."""
    values = dataclasses.asdict(req)
    out = []
    for metric in metric_names(req.metrics):
        params = {p.name: values[p.name] for p in metric.params}
        out += [(metric, name, job) for name, job in metric.jobs(params)]
    return out


def _validate(req: Any) -> None:
    check_choice("BatchNorm mode (--bn)", req.bn, BNMode)
    check_choice("dtype (--dtype)", req.dtype, CurvatureDtype)
    if not req.checkpoints:
        raise ValueError("give at least one checkpoint")
    if req.hvp_cache_gb is not None and not req.hvp_cache_gb >= 0:
        raise ValueError(f"--hvp-cache-gb must be ≥ 0 (0 keeps no graphs), got {req.hvp_cache_gb}")


def default_output(checkpoints: Sequence[Path]) -> Path:
    if len(checkpoints) == 1:
        return Path(f"{ckpt_io.run_label(checkpoints[0])}_sharpness.h5")
    return Path("sharpness.h5")


def measure(req: Any) -> Path:
    """Compute every requested metric for every checkpoint into ``req.out``; return the path."""
    _validate(req)
    jobs = result_jobs(req)
    out = Path(req.out) if req.out else default_output(req.checkpoints)
    env = distributed.setup(req.device)
    try:
        if env.is_main:
            results.ensure_sharpness_file(out)
            results.set_attrs(out, {"sharpness_request": to_dict(req)})
        cache_bytes = (memory_budget(env.device) if req.hvp_cache_gb is None else int(req.hvp_cache_gb * 1e9))
        with float32_math(req.float32_math):
            for path in req.checkpoints:
                _measure_checkpoint(Path(path), req, jobs, out, env, cache_bytes)
        if env.is_main:
            table = [(row["checkpoint_label"], row["metric"], float(row["value"]))
                     for row in results.load_sharpness(out)]
            print(format_table(table), flush=True)
            print(f"[minima.sharpness] wrote {out}", flush=True)
        distributed.barrier()
    finally:
        distributed.teardown()
    return out


def _measure_checkpoint(path: Path, req: Any, jobs: list[tuple[Metric, str, dict[str, Any]]], out: Path,
                        env: distributed.DistEnv, cache_bytes: int) -> None:
    ckpt = ckpt_io.load_checkpoint(path)
    label = ckpt_io.run_label(path)
    model = ckpt_io.model_from_checkpoint(ckpt, req.trust_import)
    ds = data_mod.load_for_checkpoint(ckpt["meta"]["data"], req.data, root=req.data_root)
    train = ds.train
    if req.samples is not None and req.samples < len(train):
        train = train.take(data_mod.stratified_subset(train.labels, req.samples, req.subset_seed))
    common = {"checkpoint": str(path), "sha256": ckpt_io.sha256_file(path), "bn": req.bn, "samples": len(train),
              "batch_size": req.batch_size, "dtype": req.dtype, "subset_seed": req.subset_seed,
              "data": json.dumps(ds.describe()), "seed": req.seed, "float32_math": req.float32_math}

    def key_of(metric: Metric, job: dict[str, Any]) -> str:
        return resume_key({**common, "metric": metric.name, **job})

    pending = [(m, name, job) for m, name, job in jobs
               if not (env.is_main and results.sharpness_done(out, label, name, key_of(m, job)))]
    if env.distributed:
        box = [[name for _, name, _ in pending]]
        torch.distributed.broadcast_object_list(box, src=0)
        pending = [j for j in jobs if j[1] in box[0]]
    if not pending:
        return
    batches = FixedBatches.from_split(train, ckpt["meta"]["data"]["mean"], ckpt["meta"]["data"]["std"],
                                      batch_size=req.batch_size, device=env.device, dtype=TORCH_DTYPES[req.dtype],
                                      rank=env.rank, world_size=env.world_size)
    obj = DatasetObjective(model, batches, bn=req.bn, hvp_cache_bytes=cache_bytes)
    if any(m.uses_hessian for m, _, _ in pending):
        obj.check_deterministic(seed=req.seed)
    x = obj.get_flat()
    f0 = obj.value(x)
    if env.is_main:
        print(f"[minima.sharpness] {label}: f(x) = {f0:.6g} on {len(train)} training samples "
              f"(BN {req.bn}); {len(pending)} metric(s) to compute", flush=True)
    bar = tqdm(pending, desc=f"sharpness {label}", disable=None if env.is_main else True, dynamic_ncols=True)
    for metric, name, job in bar:
        bar.set_postfix(metric=name)
        obj.set_flat(x)  # the metrics move θ while they search; every one starts from the checkpoint
        values = metric.compute(obj, x, f0, job, req.seed)
        if env.is_main:
            precision = json.dumps(precision_effective(env.device, req.float32_math))
            results.write_sharpness(out, label, name, {**common, **job, **values, "settings_key": key_of(metric, job),
                                                       "metric_kind": metric.name, "precision": precision})
            cache = obj.hvp_cache_info
            kept = (f"; gradient graphs of {cache['batches']}/{len(obj.batches)} batches kept "
                    f"({cache['bytes'] / 1e9:.2f} GB)") if metric.uses_hessian else ""
            print(f"[minima.sharpness] {label} {name}: {values['value']:.6g} "
                  f"({values.get('seconds', float('nan')):.1f} s{kept})", flush=True)


def format_table(rows: Sequence[tuple[str, str, float]]) -> str:
    """Checkpoints as columns, metrics as rows."""
    labels = sorted({r[0] for r in rows})
    metrics = sorted({r[1] for r in rows})
    cell = {(r[0], r[1]): r[2] for r in rows}
    width = max([len(m) for m in metrics] + [6])
    head = f"{'metric':<{width}} " + " ".join(f"{lab:>14}" for lab in labels)
    lines = [head]
    for m in metrics:
        lines.append(f"{m:<{width}} " + " ".join(
            f"{cell[(lab, m)]:>14.6g}" if (lab, m) in cell else f"{'-':>14}" for lab in labels))
    return "\n".join(lines)
