"""Run sharpness and curvature metrics on checkpoints into an HDF5 file (``python -m minima.sharpness``).

Each (checkpoint, metric) pair is stored under ``sharpness/<label>/<metric>`` with its parameters as
attributes, as soon as it finishes, so a killed run resumes by skipping finished pairs (a pair computed with
other settings is recomputed). Under ``torchrun`` every rank holds a shard of the data, gradients and
Hessian-vector products are sum-reduced, and every rank runs the same optimiser/Lanczos iterations on
identical reduced values; rank 0 writes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from minima import checkpoint as ckpt_io
from minima import data as data_mod
from minima import distributed, results
from minima.allocator import keep_freed_memory
from minima.hessian import EIGEN_METHODS, hessian_operator, hutchinson_trace, top_eigenvalues
from minima.interpolate import load_data_for, run_label
from minima.objective import BN_MODES, DatasetObjective
from minima.sharpness import RandomSubspace, adaptive_sharpness, average_sharpness, keskar_sharpness

METRICS = ("keskar", "hessian", "trace", "adaptive", "average")


@dataclass(frozen=True)
class MeasureRequest:
    """What to measure on which checkpoints, and how (every field is stored with the results)."""

    checkpoints: list[Path]
    metrics: list[str] = field(default_factory=lambda: ["keskar"])
    eps: list[float] = field(default_factory=lambda: [1e-3, 5e-4])
    subspace: int | None = 100
    subspace_seed: int = 0
    full_space: bool = True
    maxiter: int = 10
    topk: int = 5
    eig_tol: float = 1e-3
    eig_method: str = "lanczos"
    trace_rtol: float = 1e-2
    trace_max_probes: int = 100
    rho: float = 0.05
    adaptive_steps: int = 10
    sigma: float = 0.01
    average_samples: int = 10
    samples: int | None = None
    subset_seed: int = 0
    data: str | None = None
    bn: str = "eval"
    batch_size: int = 1000
    dtype: str = "float32"
    device: str = "auto"
    out: Path | None = None
    seed: int = 0
    hvp_cache_gb: float | None = None  # memory only: the numbers are the same with or without the cache


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jobs(req: MeasureRequest) -> list[tuple[str, dict[str, Any]]]:
    """(metric name, parameters) pairs in the order they run."""
    jobs: list[tuple[str, dict[str, Any]]] = []
    for metric in req.metrics:
        if metric == "keskar":
            for eps in req.eps:
                if req.full_space:
                    jobs.append((f"keskar_full_eps{eps:g}", {"kind": "keskar", "eps": eps, "p": None}))
                if req.subspace:
                    jobs.append((f"keskar_sub{req.subspace}_seed{req.subspace_seed}_eps{eps:g}",
                                 {"kind": "keskar", "eps": eps, "p": req.subspace, "seed": req.subspace_seed}))
        elif metric == "hessian":
            jobs.append((f"hessian_top{req.topk}", {"kind": "hessian", "k": req.topk, "tol": req.eig_tol,
                                                     "method": req.eig_method}))
        elif metric == "trace":
            jobs.append(("trace", {"kind": "trace", "rtol": req.trace_rtol, "max_probes": req.trace_max_probes}))
        elif metric == "adaptive":
            jobs.append((f"adaptive_rho{req.rho:g}", {"kind": "adaptive", "rho": req.rho, "steps": req.adaptive_steps}))
        elif metric == "average":
            jobs.append((f"average_sigma{req.sigma:g}",
                         {"kind": "average", "sigma": req.sigma, "samples": req.average_samples}))
        else:
            raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    return jobs


def _cache_bytes(gigabytes: float | None) -> int | None:
    if gigabytes is None:
        return None
    if not gigabytes >= 0:
        raise ValueError(f"--hvp-cache-gb must be ≥ 0 (0 keeps no graphs), got {gigabytes}")
    return int(gigabytes * 1e9)


def _compute(obj: DatasetObjective, x: torch.Tensor, f0: float, job: dict[str, Any], req: MeasureRequest) -> dict:
    obj.set_flat(x)  # the metrics move θ while they search; every one starts from the checkpoint
    kind = job["kind"]
    if kind == "keskar":
        sub = RandomSubspace(obj.numel, job["p"], seed=job["seed"]) if job["p"] else None
        r = keskar_sharpness(obj.value_and_grad, x, job["eps"], subspace=sub, maxiter=req.maxiter, f0=f0)
        return {"value": r.phi, **asdict(r)}
    if kind == "hessian":
        r = top_eigenvalues(hessian_operator(obj), k=job["k"], tol=job["tol"], method=job["method"], seed=req.seed)
        return {"value": float(r.eigenvalues[0]), "eigenvalues": r.eigenvalues, "residuals": r.residuals,
                "relative_error_bounds": r.relative_error_bounds, "hvps": r.hvps, "seconds": r.seconds,
                "tol": r.tol, "ncv": r.ncv, "method": r.method, "converged": r.converged}
    if kind == "trace":
        r = hutchinson_trace(hessian_operator(obj), rtol=job["rtol"], max_probes=job["max_probes"], seed=req.seed)
        return {"value": r.trace, **asdict(r)}
    if kind == "adaptive":
        r = adaptive_sharpness(obj.value_and_grad, x, job["rho"], steps=job["steps"])
        return {"value": r.sharpness, **asdict(r)}
    r = average_sharpness(obj.value, x, job["sigma"], samples=job["samples"], seed=req.seed)
    return {"value": r.sharpness, **asdict(r)}


def measure(req: MeasureRequest) -> Path:
    """Compute every requested metric for every checkpoint into ``req.out``; return the path."""
    if req.bn not in BN_MODES:
        raise ValueError(f"unknown --bn {req.bn!r}; choose one of {list(BN_MODES)}")
    if req.dtype not in ("float32", "float64"):
        raise ValueError(f"unknown --dtype {req.dtype!r}; choose float32 or float64")
    if not req.checkpoints:
        raise ValueError("give at least one checkpoint")
    cache_bytes = _cache_bytes(req.hvp_cache_gb)
    jobs = _jobs(req)
    out = Path(req.out) if req.out else Path(
        f"{run_label(req.checkpoints[0])}_sharpness.h5" if len(req.checkpoints) == 1 else "sharpness.h5")
    env = distributed.setup(req.device)
    try:
        if env.is_main:
            results.ensure_sharpness_file(out)
        dtype = torch.float64 if req.dtype == "float64" else torch.float32
        table: list[tuple[str, str, float]] = []
        for path in req.checkpoints:
            ckpt = ckpt_io.load_checkpoint(path)
            label = run_label(Path(path))
            model = ckpt_io.model_from_checkpoint(ckpt)
            ds = load_data_for(ckpt["meta"], req.data, None, None, req.subset_seed)
            train = ds.train
            if req.samples is not None and req.samples < len(train):
                train = train.take(data_mod.stratified_subset(train.labels, req.samples, req.subset_seed))
            common = {"checkpoint": str(path), "sha256": ckpt_io.sha256_file(path), "bn": req.bn,
                      "samples": len(train), "batch_size": req.batch_size, "dtype": req.dtype,
                      "subset_seed": req.subset_seed, "data": json.dumps(ds.describe()), "seed": req.seed,
                      "maxiter": req.maxiter}

            def key_of(job: dict[str, Any], common: dict[str, Any] = common) -> str:
                return _settings_key({**common, **job})

            pending = [(name, job) for name, job in jobs
                       if not (env.is_main and results.sharpness_done(out, label, name, key_of(job)))]
            if env.distributed:
                box = [pending]
                torch.distributed.broadcast_object_list(box, src=0)
                pending = box[0]
            if not pending:
                continue
            obj = DatasetObjective(model, train, ckpt["meta"]["data"]["mean"], ckpt["meta"]["data"]["std"],
                                   bn=req.bn, batch_size=req.batch_size, device=env.device, dtype=dtype,
                                   rank=env.rank,
                                   world_size=env.world_size, hvp_cache_bytes=cache_bytes)
            if any(job["kind"] in ("hessian", "trace") for _, job in pending):
                obj.check_deterministic(seed=req.seed)
            x = obj.get_flat()
            f0 = obj.value(x)
            if env.is_main:
                print(f"[minima.sharpness] {label}: f(x) = {f0:.6g} on {len(train)} training samples "
                      f"(BN {req.bn}); {len(pending)} metric(s) to compute", flush=True)
            bar = tqdm(pending, desc=f"sharpness {label}", disable=None if env.is_main else True, dynamic_ncols=True)
            for name, job in bar:
                bar.set_postfix(metric=name)
                values = _compute(obj, x, f0, job, req)
                if env.is_main:
                    results.write_sharpness(out, label, name, {**common, **job, **values, "settings_key": key_of(job),
                                                               "metric_kind": job["kind"]})
                    cache = obj.hvp_cache_info
                    kept = (f"; gradient graphs of {cache['batches']}/{len(obj.batches)} batches kept "
                            f"({cache['bytes'] / 1e9:.2f} GB)") if job["kind"] in ("hessian", "trace") else ""
                    print(f"[minima.sharpness] {label} {name}: {values['value']:.6g} "
                          f"({values.get('seconds', float('nan')):.1f} s{kept})", flush=True)
        if env.is_main:
            for row in results.load_sharpness(out):
                table.append((row["checkpoint_label"], row["metric"], float(row["value"])))
            print(format_table(table), flush=True)
            print(f"[minima.sharpness] wrote {out}", flush=True)
        distributed.barrier()
    finally:
        distributed.teardown()
    return out


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


def parse_args(argv: Sequence[str] | None = None) -> MeasureRequest:
    p = argparse.ArgumentParser(prog="python -m minima.sharpness", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--metrics", default="keskar", help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--eps", type=float, nargs="+", default=[1e-3, 5e-4], help="Keskar box sizes ε")
    p.add_argument("--subspace", type=int, default=100, help="random subspace dimension p (0: none)")
    p.add_argument("--subspace-seed", type=int, default=0)
    p.add_argument("--no-full-space", dest="full_space", action="store_false", help="skip A = I")
    p.add_argument("--maxiter", type=int, default=10, help="L-BFGS-B iterations (paper: 10)")
    p.add_argument("--topk", type=int, default=5, help="Hessian eigenvalues")
    p.add_argument("--eig-tol", type=float, default=1e-3,
                   help="stop once every eigenvalue's residual bound is ≤ this × |eigenvalue|")
    p.add_argument("--eig-method", choices=EIGEN_METHODS, default="lanczos",
                   help="lanczos: full reorthogonalisation, fewest HVPs, stores the basis; arpack: scipy eigsh, "
                        "bounded memory")
    p.add_argument("--trace-rtol", type=float, default=1e-2, help="Hutchinson relative standard error target")
    p.add_argument("--trace-max-probes", type=int, default=100)
    p.add_argument("--rho", type=float, default=0.05, help="adaptive sharpness radius (relative to |w|)")
    p.add_argument("--adaptive-steps", type=int, default=10)
    p.add_argument("--sigma", type=float, default=0.01, help="average sharpness noise (relative to |w|)")
    p.add_argument("--average-samples", type=int, default=10)
    p.add_argument("--samples", type=int, default=None, help="stratified training subset (default: all)")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--data", default=None, help="override the checkpoints' data")
    p.add_argument("--bn", choices=BN_MODES, default="eval", help="BatchNorm inside f: eval or batch")
    p.add_argument("--batch-size", type=int, default=1000, help="fixed evaluation batch size")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of Lanczos start, probes and noise")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--hvp-cache-gb", type=float, default=None,
                   help="memory for gradient graphs kept between Hessian-vector products at one θ (each later "
                        "product then skips the forward and first backward pass; C1: ≈ 0.67 GB per 1,000 "
                        "images); default a quarter of the available memory, 0 keeps none")
    args = vars(p.parse_args(argv))
    args["metrics"] = [m.strip() for m in args["metrics"].split(",") if m.strip()]
    args["subspace"] = args["subspace"] or None
    return MeasureRequest(**args)


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    try:
        measure(parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"[minima.sharpness] error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

