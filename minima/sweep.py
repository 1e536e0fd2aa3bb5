"""Sweeps over coordinates: loss and accuracy at every point of a grid in parameter space.

A point of the grid is a set of parameters — θ(α) = (1 − α)·θ_A + α·θ_B on the segment between two checkpoints,
θ + α·d along a filter-normalised random direction (Li et al. 2018) — evaluated exactly on the training and test
sets (see :mod:`minima.evaluate`) with an explicit BatchNorm policy, recorded in the output:

* ``recompute`` (default for models with BatchNorm): reset the running statistics at the point and re-estimate
  them on training data (a cumulative average over fixed batches, dropout off), then evaluate in eval mode;
* ``batch``: normalise with each evaluation batch's own statistics (what Keskar's scripts effectively did);
* ``interpolate``: use the interpolated running statistics; channels with a negative variance are counted
  and stored (their activations are NaN, so those samples show up as non-finite, never as silent zeros).

The machinery — :func:`evaluate_point`, :func:`sweep_points` (sharding, progress) and the grid file of
:mod:`minima.results` (pending points, resume, one point flushed at a time) — does not depend on the grid's shape;
:func:`run` is the α line between two checkpoints or along one direction. Under ``torchrun`` the points are dealt to
the ranks; rank 0 writes every point as soon as it is known.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from minima import checkpoint as ckpt_io
from minima import data as data_mod
from minima import distributed, results
from minima.config import resume_key, setting, to_dict
from minima.data import DataOnDevice, Split
from minima.directions import (
    StateDict,
    bn_buffer_names,
    lerp_state,
    negative_variance_channels,
    random_direction,
    shift_state,
)
from minima.evaluate import EvalResult, check_model_accepts, evaluate, recompute_bn_stats
from minima.fold import fold_batchnorm
from minima.models import has_batchnorm, is_convolutional
from minima.plots import save_curve_figure
from minima.precision import Float32Math, float32_math
from minima.precision import effective as precision_effective
from minima.vocab import TORCH_DTYPES, BNPolicy, DeviceName, Dtype, check_choice

DEFAULT_ALPHAS = "-1:2:25"
# Largest relative difference the endpoint check accepts: float rounding of the folded vs unfolded network
# (bfloat16: autocast rounding of every product; README has the measured differences).
ENDPOINT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}
CPU = torch.device("cpu")
PointFn = Callable[[np.ndarray], StateDict]


class EndpointMismatchError(RuntimeError):
    """α = 0 or α = 1 of a curve does not reproduce its checkpoint evaluated directly."""


def parse_alphas(text: str, what: str = "α") -> np.ndarray:
    """``START:STOP:NUM`` (NUM evenly spaced points, both ends included) or a comma-separated list.

    Raises ``ValueError`` for an empty, malformed, non-finite or duplicated grid, naming the axis ``what``."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty {what} grid; give START:STOP:NUM (e.g. -1:2:25) or a list such as 0,0.5,1")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"{what} grid {text!r} must be START:STOP:NUM, e.g. -1:2:25")
        try:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError as exc:
            raise ValueError(f"{what} grid {text!r}: START and STOP must be numbers and NUM an integer") from exc
        if num < 1:
            raise ValueError(f"{what} grid {text!r}: NUM must be ≥ 1")
        grid = np.linspace(start, stop, num)
    else:
        try:
            grid = np.array([float(x) for x in text.split(",")], dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"{what} grid {text!r} is not a comma-separated list of numbers") from exc
    if not np.isfinite(grid).all():
        raise ValueError(f"{what} grid {text!r} contains non-finite values")
    if len(np.unique(grid)) != len(grid):
        raise ValueError(f"{what} grid {text!r} repeats a value")
    return grid


@dataclass(frozen=True)
class EvalSettings:
    """How each point is evaluated: BN policy, batch size, dtype, device, memory format."""

    bn: BNPolicy = "recompute"
    batch_size: int = 1000
    dtype: torch.dtype = torch.float32
    device: torch.device = CPU
    channels_last: bool = False
    fold_bn: bool = True

    def __post_init__(self) -> None:
        check_choice("BatchNorm policy", self.bn, BNPolicy)

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the parameters and input batches (float32 under bfloat16 autocast)."""
        return torch.float32 if self.dtype == torch.bfloat16 else self.dtype

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every forward pass runs in: bfloat16 autocast for ``dtype=bfloat16``, else nothing."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved (in place) to this device, (storage) dtype and memory format."""
        model = model.to(self.device, dtype=self.storage_dtype)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


@dataclass(frozen=True)
class EvalData:
    """What every point is evaluated on: the train and test splits, the split BatchNorm statistics are
    re-estimated on (``recompute``), and the input normalisation the models were trained with."""

    train: Split
    test: Split
    bn: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def evaluate_point(model: nn.Module, state: StateDict, d: EvalData, s: EvalSettings,
                   bn_names: set[str]) -> dict[str, float | int]:
    """Load ``state`` into ``model`` (a private working copy), apply the BN policy, evaluate both splits;
    return one point of the grid file (the keys of :data:`minima.results.POINT_FIELDS`)."""
    model.load_state_dict(state)
    negative = negative_variance_channels(state, bn_names) if s.bn == "interpolate" else 0
    if s.bn == "recompute" and bn_names:
        with s.compute():
            recompute_bn_stats(model, d.bn, d.mean, d.std, batch_size=s.batch_size, device=s.device,
                               dtype=s.storage_dtype, channels_last=s.channels_last)
    use_batch = s.bn == "batch"
    # Folding BN into the preceding conv/linear is exact in eval mode (running statistics) and saves a pass
    # over every activation; with per-batch statistics it does not apply.
    net = fold_batchnorm(model) if (s.fold_bn and not use_batch and bn_names) else model
    row: dict[str, float | int] = {"bn/negative_variance": negative}
    for name, split in (("train", d.train), ("test", d.test)):
        with s.compute():
            res = evaluate(net, split, d.mean, d.std, batch_size=s.batch_size, device=s.device, dtype=s.storage_dtype,
                           channels_last=s.channels_last, bn="batch" if use_batch else "eval")
        row.update({f"{name}/loss": res.loss, f"{name}/accuracy": res.accuracy, f"{name}/nonfinite": res.nonfinite})
    return row



def sweep_points(
    model: nn.Module, point: PointFn, coords: np.ndarray, indices: Sequence[int], d: EvalData, s: EvalSettings,
    env: distributed.DistEnv | None = None, progress: bool = False,
) -> Iterator[tuple[int, dict[str, float | int]]]:
    """(index, values) for every point number in ``indices``; ``coords[index]`` is the point's coordinate row and
    ``point(row)`` its parameters. Under ``world_size > 1`` the indices are dealt to the ranks in rounds of
    ``world_size`` and every rank yields the whole round after an all-reduce."""
    rank, world_size = (env.rank, env.world_size) if env is not None else (0, 1)
    work = s.place(copy.deepcopy(model))
    bn_names = bn_buffer_names(work)
    fields = results.POINT_FIELDS
    # disable=None: tqdm switches itself off when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=len(indices), disable=None if progress else True, desc="sweep", dynamic_ncols=True)
    for start in range(0, len(indices), world_size):
        chunk = list(indices[start : start + world_size])
        if world_size == 1:
            ready = [(chunk[0], evaluate_point(work, point(coords[chunk[0]]), d, s, bn_names))]
        else:
            table = torch.zeros(world_size, len(fields), dtype=torch.float64)
            if rank < len(chunk):
                row = evaluate_point(work, point(coords[chunk[rank]]), d, s, bn_names)
                table[rank] = torch.tensor([float(row[k]) for k in fields], dtype=torch.float64)
            table = distributed.all_reduce_sum(table.to(s.device)).cpu()
            ready = [(i, {k: (int(v) if k in results.INT_FIELDS else float(v))
                          for k, v in zip(fields, table[r].tolist(), strict=True)})
                     for r, i in enumerate(chunk)]
        for i, row in ready:
            bar.update(1)
            bar.set_postfix(at=",".join(f"{c:+.2f}" for c in coords[i]), test_acc=f"{row['test/accuracy']:.3f}")
            yield i, row
    bar.close()


def interpolate(
    model_a: nn.Module, model_b: nn.Module, train: Split, test: Split, alphas: Sequence[float] | np.ndarray,
    bn: BNPolicy = "recompute", *, mean: Sequence[float], std: Sequence[float], batch_size: int = 1000,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", bn_split: Split | None = None,
    channels_last: bool | None = None,
) -> results.Curve:
    """The curve between two models in memory (the models are not modified).

    ``mean``/``std``: the normalisation the models were trained with (``Dataset.mean``/``std``, or the
    checkpoint's ``meta["data"]``). ``bn_split``: data for BatchNorm re-estimation (default ``train``).
    ``channels_last``: default on for convolutional models.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    ckpt_io.check_same_layout(state_a, state_b, "model_a", "model_b")
    s = EvalSettings(bn=bn, batch_size=batch_size, dtype=dtype, device=torch.device(device),
                     channels_last=is_convolutional(model_a) if channels_last is None else channels_last)
    d = EvalData(train, test, bn_split or train, tuple(mean), tuple(std))
    coords = alphas[:, None]
    points = dict(sweep_points(model_a, lambda c: lerp_state(state_a, state_b, float(c[0])), coords,
                               range(len(alphas)), d, s))
    values = {k: np.array([points[i][k] for i in range(len(alphas))]) for k in results.POINT_FIELDS}
    return results.curve_from_values(
        alphas, values, {"bn_policy": bn if has_batchnorm(model_a) else "none", "label_a": "A", "label_b": "B"})


# ------------------------------------------------------------------------------------- the α line, to a file
@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """How the points of any grid are evaluated, and where the results go: the settings every grid command shares
    (:class:`SweepRequest`, :class:`minima.planes.SurfaceRequest`)."""

    data: str | None = setting(None, "data: synthetic, torchvision:NAME, imagefolder:PATH, npz:PATH or a path",
                               default_text="the data recorded in the (first) checkpoint")
    train_subset: int | None = setting(None, "stratified training subset", unit="samples", default_text="all")
    test_subset: int | None = setting(None, "stratified test subset", unit="samples", default_text="all")
    subset_seed: int = setting(0, "seed of the stratified subsets")
    trust_import: tuple[str, ...] = setting((), "modules a checkpoint's import-path model may be imported from "
                                            "(package.module; also $MINIMA_TRUSTED_IMPORTS)", default_text="none")
    data_root: str | None = setting(None, "directory of torchvision data sets", default_text="~/.cache/minima")
    bn: BNPolicy | None = setting(None, "BatchNorm policy at each point", default_text="recompute for models with "
                                  "BatchNorm")
    bn_samples: int | None = setting(None, "training samples BatchNorm statistics are re-estimated on",
                                     unit="samples", default_text="the whole (sub)set")
    eval_batch_size: int = setting(1000, "evaluation batch size", unit="samples")
    resume: bool = setting(False, "compute only the points an existing --out still lacks")
    overwrite: bool = setting(False, "replace an existing --out")
    device: DeviceName = setting("auto", "compute device")
    dtype: Dtype = setting("float32", "evaluation precision; bfloat16 is an autocast preview (parameters, "
                           "BatchNorm statistics and sums stay float32/float64)")
    fold_bn: bool = setting(True, "fold eval-mode BatchNorm into the preceding conv/linear layer (exact)")
    data_on_device: DataOnDevice = setting("auto", "keep the evaluated data on the compute device (auto: when it "
                                           "takes at most half its free memory) or in pinned host memory (no)")
    float32_math: Float32Math = setting("fp32", "float32 matmuls/convolutions on CUDA: fp32 (TF32 off), tf32 or "
                                        "default (PyTorch's flags); recorded in the file")
    plot: bool = setting(True, "draw <out>.png beside the file")
    progress: bool = setting(True, "progress bar on rank 0")


@dataclass(frozen=True)
class SweepRequest(EvalOptions):
    """Everything ``python -m minima.interpolate`` can be asked to do (stored in the output file)."""

    checkpoint_a: Path = setting(help="checkpoint A (α = 0)", positional=True)
    checkpoint_b: Path | None = setting(None, "checkpoint B (α = 1); omit it with --direction random",
                                        positional=True)
    alphas: str = setting(DEFAULT_ALPHAS, "α grid: START:STOP:NUM (NUM points, both ends included) or a "
                          "comma-separated list")
    direction: Literal["segment", "random"] = setting(
        "segment", "segment A→B, or a filter-normalised random direction through A (Li et al. 2018)")
    direction_seed: int = setting(0, "seed of the random direction")
    out: Path | None = setting(None, "output .h5 file", default_text="<A>_vs_<B>.h5 or <A>_random<seed>.h5 here")


def default_output(req: SweepRequest) -> Path:
    a = ckpt_io.run_label(req.checkpoint_a)
    if req.direction == "random":
        return Path(f"{a}_random{req.direction_seed}.h5")
    assert req.checkpoint_b is not None
    return Path(f"{a}_vs_{ckpt_io.run_label(req.checkpoint_b)}.h5")


def run(req: SweepRequest) -> Path:
    """Run (or resume) a sweep into an HDF5 grid file and return its path. Works under torchrun."""
    return run_grid_study(req, _run)


def run_grid_study(req: EvalOptions, body: Callable[[Any, distributed.DistEnv], Path]) -> Path:
    """``body(req, env)`` in the process group of ``req.device`` (torchrun or one process) under the request's
    float32 math; the group is torn down and the math flags restored however it ends."""
    env = distributed.setup(req.device)
    try:
        with float32_math(req.float32_math):
            return body(req, env)
    finally:
        distributed.teardown()


def _validate(req: SweepRequest) -> tuple[np.ndarray, Path]:
    check_choice("direction", req.direction, Literal["segment", "random"])
    check_choice("dtype", req.dtype, Dtype)
    if req.bn is not None:
        check_choice("BatchNorm policy (--bn)", req.bn, BNPolicy)
    if req.direction == "segment" and req.checkpoint_b is None:
        raise ValueError("interpolation needs two checkpoints (ckptA ckptB); for a random direction through "
                         "one checkpoint use --direction random")
    if req.direction == "random" and req.checkpoint_b is not None:
        raise ValueError("--direction random takes one checkpoint, got two")
    if req.resume and req.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume keeps the finished points of "
                         "--out, --overwrite discards them; pass one")
    alphas = parse_alphas(req.alphas)
    out = Path(req.out) if req.out is not None else default_output(req)
    if out.suffix != ".h5":
        raise ValueError(f"--out {out} should end in .h5 (an HDF5 grid file)")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist; create it or choose another --out")
    return alphas, out


def evaluation_setup(req: EvalOptions, model: nn.Module, ds: data_mod.Dataset, recorded: dict[str, Any],
                     device: torch.device) -> tuple[str, EvalSettings, EvalData, dict[str, str]]:
    """What every grid point is evaluated with, from the shared options: the BatchNorm policy (``none`` for a model
    without BatchNorm), the settings, the (placed) data with the BN re-estimation subset, and the root attributes
    every grid file records about how it ran (``precision``, ``data_placement``, JSON). ``recorded``: the
    checkpoint's ``meta["data"]`` (its normalisation)."""
    bn_split = ds.train
    if req.bn_samples is not None and req.bn_samples < len(ds.train):
        bn_split = ds.train.take(data_mod.stratified_subset(ds.train.labels, req.bn_samples, req.subset_seed))
    with_bn = has_batchnorm(model)
    policy = (req.bn or "recompute") if with_bn else "none"
    s = EvalSettings(bn=policy if with_bn else "recompute", batch_size=req.eval_batch_size,
                     dtype=TORCH_DTYPES[req.dtype], device=device, channels_last=is_convolutional(model),
                     fold_bn=req.fold_bn)
    (train, test, bn_data), placement = data_mod.place([ds.train, ds.test, bn_split], req.data_on_device, device)
    runtime = {"precision": json.dumps(precision_effective(device, req.float32_math,
                                                           "bfloat16" if req.dtype == "bfloat16" else None)),
               "data_placement": json.dumps(placement.describe())}
    return policy, s, EvalData(train, test, bn_data, tuple(recorded["mean"]), tuple(recorded["std"])), runtime


def _load_pair(req: SweepRequest) -> tuple[dict[str, Any], dict[str, Any] | None]:
    ck_a = ckpt_io.load_checkpoint(req.checkpoint_a)
    ck_b = ckpt_io.load_checkpoint(req.checkpoint_b) if req.checkpoint_b is not None else None
    if ck_b is not None:
        ckpt_io.check_compatible(ck_a, ck_b, str(req.checkpoint_a), str(req.checkpoint_b))
        norm_a = (ck_a["meta"]["data"]["mean"], ck_a["meta"]["data"]["std"])
        norm_b = (ck_b["meta"]["data"]["mean"], ck_b["meta"]["data"]["std"])
        if not np.allclose(norm_a, norm_b, rtol=0, atol=1e-12):
            raise ValueError(f"A was trained with input normalisation mean/std {norm_a}, B with {norm_b}: no single "
                             "input pipeline evaluates θ(α) as both were trained; retrain on the same data")
    return ck_a, ck_b


def _run(req: SweepRequest, env: distributed.DistEnv) -> Path:
    alphas, out = _validate(req)
    ck_a, ck_b = _load_pair(req)
    model = ckpt_io.model_from_checkpoint(ck_a, req.trust_import)
    ds = data_mod.load_for_checkpoint(ck_a["meta"]["data"], req.data, req.train_subset, req.test_subset,
                                      req.subset_seed, req.data_root)
    check_model_accepts(model, ds)
    policy, s, d, runtime = evaluation_setup(req, model, ds, ck_a["meta"]["data"], env.device)

    state_a = ck_a["state_dict"]
    if ck_b is not None:
        state_b = ck_b["state_dict"]

        def point(c: np.ndarray) -> StateDict:
            return lerp_state(state_a, state_b, float(c[0]))
    else:
        direction = random_direction(model, state_a, req.direction_seed)

        def point(c: np.ndarray) -> StateDict:
            return shift_state(state_a, direction, float(c[0]))

    config = {
        "alphas": alphas.tolist(), "bn": policy, "direction": req.direction,
        "direction_seed": req.direction_seed if req.direction == "random" else None,
        "filter_normalized": req.direction == "random", "data": ds.describe(),
        "bn_samples": len(d.bn), "eval_batch_size": req.eval_batch_size, "dtype": req.dtype,
        "fold_bn": req.fold_bn, "world_size": env.world_size, "float32_math": req.float32_math,
    }
    match = {k: v for k, v in config.items() if k != "world_size"}  # what a resumed file must share
    identity = {
        "checkpoint_a": str(req.checkpoint_a), "checkpoint_b": str(req.checkpoint_b or ""),
        "sha256_a": ckpt_io.sha256_file(req.checkpoint_a),
        "sha256_b": ckpt_io.sha256_file(req.checkpoint_b) if req.checkpoint_b else "",
        "model": ck_a["model"]["name"], "bn_policy": policy, "config_key": resume_key(match), **runtime,
    }
    coords = {"alpha": alphas}

    pending: list[int] = []
    if env.is_main:
        pending = _prepare_output(out, coords, req, identity, config, match)
    if env.distributed:
        box = [pending]
        dist.broadcast_object_list(box, src=0)
        pending = box[0]

    if env.is_main and pending:
        print(f"[minima.interpolate] {len(pending)}/{len(alphas)} α points to compute → {out} "
              f"(BN policy {policy}, {len(ds.train)} train / {len(ds.test)} test samples, {env.world_size} rank(s))",
              flush=True)
    for i, row in sweep_points(model, point, results.grid_points(coords), pending, d, s, env,
                               progress=env.is_main and req.progress):
        if env.is_main:
            results.write_point(out, i, row)

    if env.is_main:
        curve = results.load_curve(out)
        print(_curve_summary(curve), flush=True)
        written = [out, save_curve_figure(curve, out.with_suffix(".png"))] if req.plot else [out]
        print(f"[minima.interpolate] wrote {' and '.join(map(str, written))}", flush=True)
        if policy == "interpolate":
            _endpoint_check(out, curve, ck_a, ck_b, d, s, req.trust_import)
    distributed.barrier()
    return out


def open_grid(out: Path, coords: dict[str, np.ndarray], *, resume: bool, overwrite: bool,
              expected: dict[str, Any], attrs: dict[str, Any], create: bool = True) -> list[int]:
    """Create the grid file ``out`` (with root ``attrs``), or decide which points an existing one still needs:
    refused unless ``resume`` or ``overwrite``; on resume it must hold the same grid and the ``expected`` attributes
    (``config`` compared field by field). Returns the point numbers to compute. With ``create=False`` nothing is
    written: the same checks, and every point for a file still to be created."""
    if out.exists() and not overwrite:
        if not resume:
            try:
                done = results.load_grid(out).complete
            except results.ResultsError as exc:
                raise results.ResultsError(f"{exc} (refusing to overwrite it)") from exc
            state = "complete" if done else "partially computed"
            raise FileExistsError(f"{out} exists and is {state}; pass --resume to compute only missing points, "
                                  "--overwrite to start again, or choose another --out")
        return results.pending_points(out, coords, expected)
    if create:
        results.create_grid_file(out, coords, attrs)
    return list(range(len(results.grid_points(coords))))


def _prepare_output(out: Path, coords: dict[str, np.ndarray], req: SweepRequest, identity: dict[str, str],
                    config: dict[str, Any], match: dict[str, Any]) -> list[int]:
    expected: dict[str, Any] = {k: identity[k] for k in ("sha256_a", "sha256_b", "bn_policy")}
    expected["config"] = match
    attrs = dict(identity, config=json.dumps(config), request=json.dumps(to_dict(req)),
                 label_a=ckpt_io.run_label(req.checkpoint_a),
                 label_b=ckpt_io.run_label(req.checkpoint_b) if req.checkpoint_b else f"random direction (seed "
                 f"{req.direction_seed})")
    return open_grid(out, coords, resume=req.resume, overwrite=req.overwrite, expected=expected, attrs=attrs)


def _endpoint_check(out: Path, curve: results.Curve, ck_a: dict, ck_b: dict | None, d: EvalData,
                    s: EvalSettings, trusted: Sequence[str] = ()) -> None:
    """With interpolated BN statistics, α = 0 and α = 1 must reproduce checkpoints A and B evaluated as
    they are; store and print the largest relative difference (a validity check of the whole pipeline), and
    raise :class:`EndpointMismatchError` naming the endpoint when it exceeds the dtype's tolerance."""
    checks: dict[str, Any] = {}
    for alpha, ck, name in ((0.0, ck_a, "a"), (1.0, ck_b, "b")):
        hits = np.flatnonzero(curve.alpha == alpha)
        if ck is None or not len(hits):
            continue
        model = s.place(ckpt_io.model_from_checkpoint(ck, trusted))
        diffs = []
        for split_name, split in (("train", d.train), ("test", d.test)):
            with s.compute():
                ref: EvalResult = evaluate(model, split, d.mean, d.std, batch_size=s.batch_size, device=s.device,
                                           dtype=s.storage_dtype, channels_last=s.channels_last)
            got_loss = getattr(curve, f"{split_name}_loss")[hits[0]]
            got_acc = getattr(curve, f"{split_name}_accuracy")[hits[0]]
            diffs += [abs(got_loss - ref.loss) / max(abs(ref.loss), 1e-12), abs(got_acc - ref.accuracy)]
        checks[f"endpoint_{name}_max_rel_diff"] = float(max(diffs))
    if not checks:
        return
    results.set_attrs(out, checks)
    tolerance = ENDPOINT_TOLERANCE[s.dtype]
    bad = {k: v for k, v in checks.items() if not v <= tolerance}
    if bad:
        detail = "; ".join(f"checkpoint {k.split('_')[1].upper()} (α = {0 if '_a_' in k else 1}) differs by {v:.2e}"
                           for k, v in bad.items())
        raise EndpointMismatchError(
            f"endpoint check failed: {detail} (relative, tolerance {tolerance:g} for {s.dtype}) between the curve "
            f"and the checkpoint evaluated directly; the curve in {out} is kept, but its values are suspect — "
            "check that both checkpoints load and evaluate as trained (BatchNorm, dtype, --no-fold-bn)")
    print(f"[minima.interpolate] endpoint check OK: α=0/1 vs checkpoints evaluated directly, "
          f"max relative difference {max(checks.values()):.2e}", flush=True)


def _curve_summary(curve: results.Curve) -> str:
    lines = [f"{'alpha':>7} {'train loss':>11} {'train acc':>9} {'test loss':>11} {'test acc':>9} {'nonfinite':>9}"]
    for i, a in enumerate(curve.alpha):
        nf = int(curve.train_nonfinite[i]) + int(curve.test_nonfinite[i])
        lines.append(f"{a:7.3f} {curve.train_loss[i]:11.4g} {curve.train_accuracy[i]:9.4f} "
                     f"{curve.test_loss[i]:11.4g} {curve.test_accuracy[i]:9.4f} {nf:9d}")
    return "\n".join(lines)


