"""Measurement study: sharpness and curvature metrics of checkpoints into an HDF5 file.

Each (checkpoint, result) pair is stored under ``sharpness/<label>/<result>`` with its parameters as attributes
as soon as it finishes, so a killed run resumes by skipping finished pairs; a pair computed with other settings
(another resume key, :func:`minima.core.config.resume_key`) is recomputed. Which metrics exist, their parameters and
their result names come from the registry :mod:`minima.curvature.registry`, read when a request type is built
(:func:`measure_request_type`, called when a command parses its arguments), so a metric registered after importing
any minima module — or installed under the ``minima.metrics`` entry-point group — has its flags and fields. Under
``torchrun`` every rank holds a shard of the data, gradients and Hessian-vector products are sum-reduced, and every
rank runs the same optimiser/Lanczos iterations on identical reduced values; rank 0 writes; a refusal on any rank is
raised on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from minima.core import distributed
from minima.core.allocator import memory_budget
from minima.core.cli import duration
from minima.core.config import resume_key, setting, to_dict
from minima.core.options import CheckpointData
from minima.core.precision import effective as precision_effective
from minima.core.precision import float32_math
from minima.core.vocab import TORCH_DTYPES, BNMode, Curvature, CurvatureDtype, check_choice
from minima.curvature.blocks import describe_block, parameter_blocks
from minima.curvature.measures import keskar_overheads
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.registry import (
    MEASURED,
    REGISTRY,
    WORST_N,
    Metric,
    Param,
    batch_objectives,
    get_metric,
    load_plugins,
)
from minima.curvature.worstcase import iteration_seconds
from minima.data import load_for_checkpoint
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.files.naming import check_output, natural_key, unique_labels
from minima.geometry.evaluate import Batching, recorded_loss


@dataclass(frozen=True, kw_only=True)
class MeasureOptions(CheckpointData):
    """The settings of a measurement besides the metrics' own parameters (see :func:`measure_request_type`)."""

    checkpoints: list[Path] = setting(help="checkpoints to measure", positional=True)
    metrics: tuple[str, ...] = setting(("keskar",), "metrics to compute (names, or one comma-separated list; "
                                       "--help lists them with their parameters)")
    bn_mode: BNMode = setting("eval", "BatchNorm inside f: eval (running statistics: the function the network "
                              "computes when it predicts, the default) or batch (each fixed batch's statistics, "
                              "as Keskar's Keras code and experiments.keskar compute it)")
    dtype: CurvatureDtype = setting("float32", "precision of the network; sums are float64")
    out: Path | None = setting(None, "output .h5 file (a curve file is accepted too: results go under "
                               "sharpness/)",
                               default_text="<label>[_<label2>…]_sharpness.h5 beside the first checkpoint")
    seed: int = setting(0, "seed of Lanczos start vectors, probes and noise")
    blocks: str = setting("all", "restrict the curvature metrics (hessian, trace, trace_sq, diagonal, density) to "
                          "diagonal Hessian blocks: all (the whole network), layers (each weight with its bias), "
                          "modules (each module's parameters) or "
                          "REGEX[,REGEX…] (each a block of the parameter names it matches); one result per block, "
                          "named <result>@<block>")
    curvature: Curvature = setting("hessian", "the matrix the curvature metrics measure: the Hessian; ggn, the "
                                   "generalised Gauss–Newton matrix Jᵀ H_out J; ef, the empirical Fisher (the data's "
                                   "labels); fisher, the Monte-Carlo Fisher (labels drawn from the model, --seed; its "
                                   "expectation is the GGN) — the last three positive semi-definite, results named "
                                   "<result>_<curvature>")
    hvp_cache_gb: float | None = setting(None, "memory for gradient graphs kept between Hessian-vector products "
                                         "at one θ (0 keeps none; the numbers are the same)", unit="GB",
                                         default_text="a quarter of the available memory")


# Old flag → field spellings of the measurement request, accepted for one release with a deprecation line.
DEPRECATED_FLAGS = {"samples": "train_subset", "batch_size": "eval_batch_size", "bn": "bn_mode"}
_TYPES: dict[tuple, type] = {}


def _metric_field(p: Param) -> tuple[str, Any, Any]:
    return p.name, p.type, setting(p.default, p.help, unit=p.unit, default_text=p.default_text)


def measure_request_type() -> type:
    """The request class for the metrics registered now (entry-point plugins loaded first):
    :class:`MeasureOptions` plus one field per metric parameter. Built again whenever the registry has changed, so
    a metric registered at any time gets its fields; ``minima.studies.sharpness.MeasureRequest`` is this class."""
    load_plugins()
    key = tuple((m.name, tuple(p.name for p in m.params)) for m in REGISTRY.values())
    if key not in _TYPES:
        cls = dataclasses.make_dataclass(
            "MeasureRequest", [_metric_field(p) for m in REGISTRY.values() for p in m.params],
            bases=(MeasureOptions,), frozen=True, kw_only=True)
        cls.__module__ = __name__
        cls.__doc__ = ("What to measure on which checkpoints, and how: the common fields (MeasureOptions) plus every "
                       "registered metric's parameters (minima.curvature.registry). Stored with the results.")
        _TYPES[key] = cls
    return _TYPES[key]


def __getattr__(name: str) -> Any:
    if name == "MeasureRequest":
        return measure_request_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def metric_list(requested: Sequence[str]) -> list[Metric]:
    """The registered metrics named in ``requested`` (entries may be comma-separated lists); unknown names are
    an error listing the choices."""
    names = [n.strip() for item in requested for n in str(item).split(",") if n.strip()]
    if not names:
        raise ValueError(f"give at least one metric; choose from {sorted(REGISTRY)}")
    return [get_metric(n) for n in names]


def measured_images(req: MeasureOptions, checkpoints: Sequence[dict[str, Any]]) -> int | None:
    """How many training images ``req`` measures, known before the data is read: ``--train-subset``, or the
    fewest that the ``checkpoints`` record (``meta["data"]["train_size"]``) when no other data is named."""
    if req.train_subset is not None:
        return req.train_subset
    sizes = [c["meta"].get("data", {}).get("train_size") for c in checkpoints] if req.data is None else []
    return min(sizes) if sizes and None not in sizes else None


def result_jobs(req: MeasureOptions, measured: int | None = None) -> list[tuple[Metric, str, dict[str, Any]]]:
    """(metric, result name, parameters) in the order they run. A parameter the request has no field for (its
    type was built before the metric was registered) takes the parameter's default. ``measured``: the number of
    training images measured (:func:`measured_images`; ``--train-subset`` when not given), where a default depends
    on it (``--worst-n``)."""
    values = {f.name: getattr(req, f.name) for f in dataclasses.fields(req)}
    measured = req.train_subset if measured is None else measured
    out = []
    for metric in metric_list(req.metrics):
        params = {p.name: values.get(p.name, p.default) for p in metric.params} | {MEASURED: measured}
        out += [(metric, name, job) for name, job in metric.jobs(params)]
    return out


def _validate(req: MeasureOptions) -> None:
    check_choice("BatchNorm mode (--bn-mode)", req.bn_mode, BNMode)
    check_choice("dtype (--dtype)", req.dtype, CurvatureDtype)
    if not req.checkpoints:
        raise ValueError("give at least one checkpoint")
    if req.test_subset is not None:
        raise ValueError("--test-subset has no effect on sharpness (f is defined on training data); drop it, or use "
                         "--train-subset")
    if req.hvp_cache_gb is not None and not req.hvp_cache_gb >= 0:
        raise ValueError(f"--hvp-cache-gb must be ≥ 0 (0 keeps none), got {req.hvp_cache_gb}")
    check_output(_output(req), "an HDF5 results file")


def default_output(checkpoints: Sequence[Path]) -> Path:
    """Beside the first checkpoint: ``<label>_sharpness.h5``, or ``<label1>_<label2>…_sharpness.h5`` for several."""
    labels = unique_labels(checkpoints)
    name = "_".join(labels[:4]) + ("_etc" if len(labels) > 4 else "")
    return Path(checkpoints[0]).parent / f"{name}_sharpness.h5"


def _output(req: MeasureOptions) -> Path:
    return Path(req.out) if req.out else default_output(req.checkpoints)


def measure(req: MeasureOptions) -> Path:
    """Compute every requested metric for every checkpoint into ``req.out``; return the path."""
    out = _output(req)
    with distributed.session(req.device) as env:
        distributed.agree(env, lambda: _validate(req))
        # every checkpoint is read and its model rebuilt before the output is touched: a refusal leaves no file
        loaded = distributed.agree(env, lambda: [_load(Path(p), req) for p in req.checkpoints])
        jobs = distributed.agree(env, lambda: result_jobs(req, measured_images(req, [c for c, _ in loaded])))
        if env.is_main:
            _say_shrunk_defaults(req, jobs)
        per_checkpoint = distributed.agree(env, lambda: [block_jobs(jobs, model, req.blocks, req.curvature)
                                                         for _, model in loaded])

        labels = distributed.agree(env, lambda: unique_labels(req.checkpoints))
        distributed.from_main(env, lambda: (results.check_sharpness_output(out),  # made by the first result
                                            _check_labels(out, req.checkpoints, labels)))
        cache_bytes = (memory_budget(env.device) if req.hvp_cache_gb is None else int(req.hvp_cache_gb * 1e9))
        with float32_math(req.float32_math):
            computed = sum(_measure_checkpoint(Path(path), label, ckpt, model, req, mine, out, env, cache_bytes)
                           for path, label, (ckpt, model), mine in zip(req.checkpoints, labels, loaded,
                                                                       per_checkpoint, strict=True))
        if env.is_main:
            print(format_table(results.load_sharpness(out)), flush=True)
            print(f"[minima.sharpness] wrote {computed} result(s) to {out}" if computed else
                  f"[minima.sharpness] nothing to compute: every result is already in {out}", flush=True)
        distributed.barrier()
    return out


def _say_shrunk_defaults(req: MeasureOptions, jobs: list[tuple[Metric, str, dict[str, Any]]]) -> None:
    """One line for each default that does not fit the measured images and was shrunk to all of them."""
    for metric, _, job in jobs:
        if metric.name == "worst_case" and getattr(req, "worst_n", None) is None and job["n"] < WORST_N:
            print(f"[minima.sharpness] --worst-n: the default {WORST_N:,} exceeds the training images measured; "
                  f"worst_case uses {job['n']:,} of them (batches of {job['m']})", flush=True)
            return


def block_jobs(jobs: list[tuple[Metric, str, dict[str, Any]]], model: nn.Module, spec: str,
               curvature: str = "hessian") -> list[tuple[Metric, str, dict[str, Any]]]:
    """``jobs`` with every blockwise metric's job measuring ``curvature`` (``ggn``, ``ef``, ``fisher``: result
    ``<name>_<curvature>``) and
    replaced by one job per block of ``spec`` (result ``<name>@<block>``, the block's label, parameter names and size
    in the job); unchanged for the Hessian of the whole network."""
    check_choice("curvature (--curvature)", curvature, Curvature)
    if curvature != "hessian":
        jobs = [(m, f"{name}_{curvature}", {**job, "curvature": curvature}) if m.blockwise else (m, name, job)
                for m, name, job in jobs]
    blocks = parameter_blocks([(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad], spec)
    if not blocks:
        return jobs
    out = []
    for metric, name, job in jobs:
        if metric.blockwise:
            out += [(metric, f"{name}@{b.label}", {**job, "block": b.label, "block_params": list(b.names),
                                                    "block_size": b.size}) for b in blocks]
        else:
            out.append((metric, name, job))
    return out


def recorded(req: MeasureOptions) -> bool:
    """Whether every result ``req`` asks for (every checkpoint's label × every result name, per block when blocks are
    asked for) is already in its output file: reads only, so a pipeline can ask it of a stage before running it."""
    out = _output(req)
    if not out.exists() or not all(Path(c).exists() for c in req.checkpoints):
        return False
    have = {(r["checkpoint_label"], r["metric"]) for r in results.load_sharpness(out)}
    ckpts = [ckpt_io.load_checkpoint(req.checkpoints[0])]
    if req.train_subset is None and req.data is None:  # the measured count comes from every checkpoint's record
        ckpts += [ckpt_io.load_checkpoint(c) for c in req.checkpoints[1:]]
    model = ckpt_io.model_from_checkpoint(ckpts[0], req.trust_import)
    want = {(label, name) for label in unique_labels(req.checkpoints)
            for _, name, _ in block_jobs(result_jobs(req, measured_images(req, ckpts)), model, req.blocks,
                                         req.curvature)}
    return want <= have


def _load(path: Path, req: MeasureOptions) -> tuple[dict[str, Any], nn.Module]:
    ckpt = ckpt_io.load_checkpoint(path)
    return ckpt, ckpt_io.model_from_checkpoint(ckpt, req.trust_import)


def _check_labels(out: Path, checkpoints: Sequence[str], labels: Sequence[str]) -> None:
    """Refuse to store a checkpoint's results under a label that ``out`` already holds for another checkpoint (another
    file and other contents): the results would overwrite each other. The same file again (or a run retrained in
    place) keeps its label and resumes or replaces its results as before."""
    recorded = results.sharpness_checkpoints(out)
    for path, label in zip(checkpoints, labels, strict=True):
        if label not in recorded:
            continue
        other, sha = recorded[label]
        if Path(other).resolve() != Path(path).resolve() and sha != ckpt_io.sha256_file(path):
            raise ValueError(f"{out} already holds results labelled {label!r} for another checkpoint ({other}); "
                             f"measuring {path} there would overwrite them — choose another --out")


def _measure_checkpoint(path: Path, label: str, ckpt: dict[str, Any], model: nn.Module, req: MeasureOptions,
                        jobs: list[tuple[Metric, str, dict[str, Any]]], out: Path, env: distributed.DistEnv,
                        cache_bytes: int) -> int:
    """Every pending result of one checkpoint; returns how many were computed."""
    ds = distributed.agree(env, lambda: load_for_checkpoint(ckpt["meta"]["data"], req.data, req.train_subset, None,
                                                            req.subset_seed, req.data_root, mode=req.subset_mode))
    train = ds.train
    common = {"checkpoint": str(path), "sha256": ckpt_io.sha256_file(path), "bn_mode": req.bn_mode,
              "train_samples": len(train), "eval_batch_size": req.eval_batch_size, "dtype": req.dtype,
              "subset_seed": req.subset_seed, "data": json.dumps(ds.describe()), "seed": req.seed,
              "float32_math": req.float32_math,
              # the loss enters the record (and the resume key) only when it is not the default cross-entropy, so
              # results measured before the choice existed still resume
              **({"loss": recorded_loss(ckpt["meta"])} if recorded_loss(ckpt["meta"]) != "cross_entropy" else {})}

    def key_of(metric: Metric, job: dict[str, Any]) -> str:
        return resume_key({**common, "metric": metric.name, **job})

    done = distributed.from_main(env, lambda: [name for m, name, job in jobs
                                               if results.sharpness_done(out, label, name, key_of(m, job))])
    pending = [j for j in jobs if j[1] not in done]
    if not pending:
        return 0
    feed = Batching(req.eval_batch_size, env.device, TORCH_DTYPES[req.dtype])
    batches = FixedBatches.from_split(train, ckpt["meta"]["data"]["mean"], ckpt["meta"]["data"]["std"], feed,
                                      rank=env.rank, world_size=env.world_size)
    obj = DatasetObjective(model, batches, bn=req.bn_mode, hvp_cache_bytes=cache_bytes,
                           loss=recorded_loss(ckpt["meta"]))
    unit: dict[str, float] = {}
    if any(m.uses_hessian for m, _, _ in pending):
        obj.observer = _stopwatch(unit, "hvp")  # the second of the check's two products, each building its graph
        obj.check_deterministic(seed=req.seed)
        obj.observer = None
    x = obj.get_flat()
    f0 = obj.value(x)
    obj.observer = _stopwatch(unit, "f")
    obj.value()  # timed once more, warm (the same f(x); θ and the stored graphs untouched)
    obj.observer = None
    unit["grad"] = 3 * unit["f"]  # a backward pass costs about two forward passes
    unit["grad_image"] = unit["grad"] / len(train)  # ∇f of one image (metrics working on batches of their own)
    worst = [job for m, _, job in pending if m.name == "worst_case" and job["m"] <= len(train)]
    if worst:  # small batches cost more per image (per-call work on every weight), and Auto-PGD's vector work
        unit["grad_image"] = _small_batch_seconds(obj, x, worst[0]["m"]) / worst[0]["m"]
        unit["apgd_iteration"] = iteration_seconds(x, worst[0]["rho"], norm=worst[0]["norm"],
                                                   adaptive=worst[0]["adaptive"], l2_step=worst[0]["l2_step"])
    if any(m.name == "keskar" for m, _, _ in pending):
        unit.update(keskar_overheads(obj.numel, env.device))
    if env.is_main:
        print(f"[minima.sharpness] {label}: f(x) = {f0:.6g} on {len(train)} training samples "
              f"(BN {req.bn_mode}); {len(pending)} result(s) to compute, estimated "
              f"{_estimate(pending, unit)} from the cost of f, ∇f and H·v (corrected after each result)", flush=True)
    ratio: dict[str, float] = {}  # measured / modelled seconds, per metric: corrects the estimate as results finish
    for done_count, (metric, name, job) in enumerate(pending, start=1):
        t_job = time.perf_counter()
        calls = metric.cost(job) if metric.cost is not None else {}
        bar = tqdm(total=sum(calls.values()) or None, desc=f"{label} {name}", unit="eval", leave=False,
                   disable=None if env.is_main else True, dynamic_ncols=True)
        obj.observer = lambda kind, bar=bar: bar.update(1)
        obj.set_flat(x)  # the metrics move θ while they search; every one starts from the checkpoint
        try:
            values = metric.compute(obj, x, f0, job, req.seed)
        finally:
            obj.observer = None
            bar.close()
        if env.is_main:
            precision = json.dumps(precision_effective(env.device, req.float32_math))
            results.ensure_sharpness_file(out)
            results.set_attrs(out, {"sharpness_request": to_dict(req)})
            block = {"block_modules": describe_block(model, job["block_params"])} if "block_params" in job else {}
            results.write_sharpness(out, label, name, {**common, **job, **values, **block,
                                                       "settings_key": key_of(metric, job),
                                                       "metric_kind": metric.name, "precision": precision})
            cache = obj.hvp_cache_info
            kept = (f"; gradient graphs of {cache['batches']}/{len(obj.batches)} batches kept "
                    f"({cache['bytes'] / 1e9:.2f} GB)") if metric.uses_hessian else ""
            modelled = _seconds([(metric, name, job)], unit)
            if modelled > 0:
                ratio[_kind(name)] = (time.perf_counter() - t_job) / modelled
            rest = pending[done_count:]
            left = (f"; {done_count}/{len(pending)} done, about {duration(_seconds(rest, unit, ratio))} left"
                    if rest else "")
            print(f"[minima.sharpness] {label} {name}: {values['value']:.6g} "
                  f"({values.get('seconds', float('nan')):.1f} s{kept}{left})", flush=True)
    return len(pending)


SETTINGS_SHOWN = ("bn_mode", "bn", "train_samples", "dtype", "eval_batch_size", "batch_size", "subset_seed",
                  "float32_math")
# ("bn" and "batch_size": the names in files written before --bn-mode/--eval-batch-size)


def _small_batch_seconds(obj: DatasetObjective, x: Any, m: int) -> float:
    """Seconds of one ∇f on a batch of ``m`` of the measured images (the faster of two, after the first)."""
    sub = batch_objectives(obj, m, m)[:1]
    if not sub:
        return 0.0
    sub[0].value_and_grad(x)
    timed = []
    for _ in range(2):
        t0 = time.perf_counter()
        sub[0].value_and_grad(x)
        timed.append(time.perf_counter() - t0)
    return min(timed)


def _stopwatch(unit: dict[str, float], kind: str) -> Callable[[str], None]:
    """An objective observer that stores in ``unit[kind]`` the seconds since the previous evaluation of that kind
    it saw (evaluations of other kinds are ignored)."""
    last = [time.perf_counter()]

    def observe(seen: str) -> None:
        if seen != kind:
            return
        now = time.perf_counter()
        unit[kind] = now - last[0]
        last[0] = now

    return observe


def _seconds(jobs: Sequence[tuple[Metric, str, dict[str, Any]]], unit: dict[str, float],
             ratio: dict[str, float] | None = None) -> float:
    """Modelled seconds of ``jobs``: each metric's expected evaluations (``Metric.cost``) at the measured cost of
    one f, ∇f and H·v (``unit``), times the measured/modelled ratio of that metric's finished results (``ratio``:
    what the model misses, e.g. L-BFGS-B's own work on millions of parameters, is learnt from the first one)."""
    ratio = ratio or {}
    total = 0.0
    for metric, name, job in jobs:
        if metric.cost is not None:
            total += sum(n * unit.get(kind, unit["grad"]) for kind, n in metric.cost(job).items()) * (
                ratio.get(_kind(name), 1.0))
    return total


def _kind(name: str) -> str:
    """A result name without its numbers (``keskar_sub100_seed0_eps0.001`` → ``keskar_sub_seed_eps``): results of
    one kind share a measured/modelled ratio."""
    return re.sub(r"[0-9.]+", "", name)


def _estimate(jobs: Sequence[tuple[Metric, str, dict[str, Any]]], unit: dict[str, float]) -> str:
    """The up-front estimate of ``jobs`` (:func:`_seconds`); metrics without a cost model are named."""
    unknown = [name for metric, name, _ in jobs if metric.cost is None]
    return duration(_seconds(jobs, unit)) + (f" (without {', '.join(unknown)}: no cost model)" if unknown else "")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Checkpoints as columns, results as rows, and under them the settings each column was measured with
    (BatchNorm mode, training images, dtype, batch size, subset seed, float32 math). Results of one column measured
    with different settings are marked ``*`` and listed, and columns measured with different settings are said to
    be so: numbers of different protocols are never shown as one table without saying it."""
    labels = sorted({str(r["checkpoint_label"]) for r in rows}, key=natural_key)  # epoch_2 before epoch_10
    metrics = sorted({str(r["metric"]) for r in rows}, key=natural_key)  # hessian@net.2 before hessian@net.10
    cell = {(str(r["checkpoint_label"]), str(r["metric"])): r for r in rows}

    def settings(r: dict[str, Any]) -> tuple[str, ...]:
        return tuple(f"{k}={r[k]}" for k in SETTINGS_SHOWN if k in r)

    per_column = {lab: [settings(r) for (c, _), r in cell.items() if c == lab] for lab in labels}
    common = {lab: max(set(s), key=s.count) for lab, s in per_column.items()}
    width = max([len(m) for m in metrics] + [6])
    lines = [f"{'metric':<{width}} " + " ".join(f"{lab:>15}" for lab in labels)]
    odd = []
    for m in metrics:
        cells = []
        for lab in labels:
            r = cell.get((lab, m))
            if r is None:
                cells.append(f"{'-':>15}")
                continue
            mark = "*" if settings(r) != common[lab] else " "
            if mark == "*":
                odd.append(f"  * {lab} {m}: " + ", ".join(settings(r)))
            cells.append(f"{float(r['value']):>14.6g}{mark}")
        lines.append(f"{m:<{width}} " + " ".join(cells))
    lines.append("measured with:")
    lines += [f"  {lab}: " + ", ".join(common[lab]) for lab in labels]
    lines += odd
    if len(set(common.values())) > 1:
        lines.append("  note: the columns were measured with different settings; compare them with care")
    return "\n".join(lines)


def show(path: str | Path) -> str:
    """The table of a sharpness (or curve/grid) file's results, with their settings (``--show FILE.h5``)."""
    rows = results.load_sharpness(path)
    if not rows:
        raise ValueError(f"{path} holds no sharpness results yet")
    return format_table(rows)
