"""Loss and accuracy along θ(α) = (1 − α)·θ_A + α·θ_B, and ``python -m minima.interpolate ckptA ckptB``.

Each α is evaluated exactly on the training and test sets (see :mod:`minima.evaluate`) with an explicit
BatchNorm policy, recorded in the output:

* ``recompute`` (default for models with BatchNorm): reset the running statistics of θ(α) and re-estimate
  them on training data (a cumulative average over fixed batches, dropout off), then evaluate in eval mode;
* ``batch``: normalise with each evaluation batch's own statistics (what Keskar's scripts effectively did);
* ``interpolate``: use the interpolated running statistics; channels with a negative variance are counted
  and stored (their activations are NaN, so those samples show up as non-finite, never as silent zeros).

With ``--direction random`` and one checkpoint the same sweep runs along a filter-normalised random
direction through it, θ(α) = θ + α·d (Li et al. 2018), writing the same file format.
Under ``torchrun`` the α points are sharded across ranks; rank 0 writes every row as soon as it is known.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from minima import checkpoint as ckpt_io
from minima import data as data_mod
from minima import distributed, results
from minima.allocator import keep_freed_memory
from minima.evaluate import EvalResult, check_model_accepts, evaluate, recompute_bn_stats
from minima.fold import fold_batchnorm
from minima.models import CONVOLUTIONAL, has_batchnorm
from minima.params import (
    BN_POLICIES,
    StateDict,
    bn_buffer_names,
    lerp_state,
    negative_variance_channels,
    random_direction,
    shift_state,
)

DEFAULT_ALPHAS = "-1:2:25"
# bfloat16: parameters, running statistics and sums stay float32/float64; convolutions and matrix products run
# in bfloat16 under autocast (a fast preview, ≈ 3 significant digits; see the README for its measured error).
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Largest relative difference the endpoint check accepts: float rounding of the folded vs unfolded network
# (bfloat16: 1.1e-3 measured on trained C1 checkpoints, see the README).
ENDPOINT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}
Split = data_mod.Split
CPU = torch.device("cpu")


def parse_alphas(text: str) -> np.ndarray:
    """``START:STOP:NUM`` (NUM evenly spaced points, both ends included) or a comma-separated list.

    Raises ``ValueError`` for an empty, malformed, non-finite or duplicated grid."""
    text = text.strip()
    if not text:
        raise ValueError("empty α grid; give START:STOP:NUM (e.g. -1:2:25) or a list such as 0,0.5,1")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"α grid {text!r} must be START:STOP:NUM, e.g. -1:2:25")
        try:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError as exc:
            raise ValueError(f"α grid {text!r}: START and STOP must be numbers and NUM an integer") from exc
        if num < 1:
            raise ValueError(f"α grid {text!r}: NUM must be ≥ 1")
        grid = np.linspace(start, stop, num)
    else:
        try:
            grid = np.array([float(x) for x in text.split(",")], dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"α grid {text!r} is not a comma-separated list of numbers") from exc
    if not np.isfinite(grid).all():
        raise ValueError(f"α grid {text!r} contains non-finite values")
    if len(np.unique(grid)) != len(grid):
        raise ValueError(f"α grid {text!r} repeats a value")
    return grid


@dataclass(frozen=True)
class EvalSettings:
    """How each point is evaluated: BN policy, batch size, dtype, device, memory format."""

    bn: str = "recompute"
    batch_size: int = 1000
    dtype: torch.dtype = torch.float32
    device: torch.device = CPU
    channels_last: bool = False
    fold_bn: bool = True

    def __post_init__(self) -> None:
        if self.bn not in BN_POLICIES:
            raise ValueError(f"unknown BatchNorm policy {self.bn!r}; choose one of {list(BN_POLICIES)}")

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


def evaluate_point(
    model: nn.Module, state: StateDict, train: Split, test: Split, bn_split: Split,
    mean: Sequence[float], std: Sequence[float], s: EvalSettings, bn_names: set[str],
) -> dict[str, float | int]:
    """Load ``state`` into ``model`` (a private working copy), apply the BN policy, evaluate both splits;
    return one row of the curve file."""
    model.load_state_dict(state)
    negative = negative_variance_channels(state, bn_names) if s.bn == "interpolate" else 0
    if s.bn == "recompute" and bn_names:
        with s.compute():
            recompute_bn_stats(model, bn_split, mean, std, batch_size=s.batch_size, device=s.device,
                               dtype=s.storage_dtype, channels_last=s.channels_last)
    use_batch = s.bn == "batch"
    # Folding BN into the preceding conv/linear is exact in eval mode (running statistics) and saves a pass
    # over every activation; with per-batch statistics it does not apply.
    net = fold_batchnorm(model) if (s.fold_bn and not use_batch and bn_names) else model
    row: dict[str, float | int] = {"bn/negative_variance": negative}
    for name, split in (("train", train), ("test", test)):
        with s.compute():
            res = evaluate(net, split, mean, std, batch_size=s.batch_size, device=s.device, dtype=s.storage_dtype,
                           channels_last=s.channels_last, bn_batch_stats=use_batch)
        row.update({f"{name}/loss": res.loss, f"{name}/accuracy": res.accuracy, f"{name}/nonfinite": res.nonfinite})
    return row



def _rows(
    model: nn.Module, point: Callable[[float], StateDict], alphas: np.ndarray, indices: Sequence[int],
    train: Split, test: Split, bn_split: Split, mean: Sequence[float], std: Sequence[float], s: EvalSettings,
    rank: int = 0, world_size: int = 1, progress: bool = False,
) -> Iterator[tuple[int, dict[str, float | int]]]:
    """(index, row) for every index in ``indices``; under ``world_size > 1`` the indices are dealt to the
    ranks in rounds of ``world_size`` and every rank yields the whole round after an all-reduce."""
    work = s.place(copy.deepcopy(model))
    bn_names = bn_buffer_names(work)
    # disable=None: tqdm switches itself off when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=len(indices), disable=None if progress else True, desc="α sweep", dynamic_ncols=True)
    for start in range(0, len(indices), world_size):
        chunk = list(indices[start : start + world_size])
        if world_size == 1:
            row = evaluate_point(work, point(float(alphas[chunk[0]])), train, test, bn_split, mean, std, s, bn_names)
            ready = [(chunk[0], row)]
        else:
            table = torch.zeros(world_size, len(results.ROW_FIELDS), dtype=torch.float64)
            if rank < len(chunk):
                row = evaluate_point(work, point(float(alphas[chunk[rank]])), train, test, bn_split, mean, std, s,
                                     bn_names)
                table[rank] = torch.tensor([float(row[k]) for k in results.ROW_FIELDS], dtype=torch.float64)
            table = distributed.all_reduce_sum(table.to(s.device)).cpu()
            ready = [(i, {k: (int(v) if k in results._INT_FIELDS else float(v))
                          for k, v in zip(results.ROW_FIELDS, table[r].tolist(), strict=True)})
                     for r, i in enumerate(chunk)]
        for i, row in ready:
            bar.update(1)
            bar.set_postfix(alpha=f"{alphas[i]:+.2f}", test_acc=f"{row['test/accuracy']:.3f}")
            yield i, row
    bar.close()


def interpolate(
    model_a: nn.Module, model_b: nn.Module, train: Split, test: Split, alphas: Sequence[float] | np.ndarray,
    bn: str = "recompute", *, mean: Sequence[float], std: Sequence[float], batch_size: int = 1000,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", bn_split: Split | None = None,
    channels_last: bool | None = None,
) -> results.Curve:
    """The curve between two models in memory (the models are not modified).

    ``mean``/``std``: the normalisation the models were trained with (``Dataset.mean``/``std``, or the
    checkpoint's ``meta["data"]``). ``bn_split``: data for BatchNorm re-estimation (default ``train``).
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    ckpt_io.check_compatible({"model": {"name": "a", "kwargs": {}}, "state_dict": state_a},
                             {"model": {"name": "a", "kwargs": {}}, "state_dict": state_b})
    is_conv = any(isinstance(m, nn.Conv2d) for m in model_a.modules())
    s = EvalSettings(bn=bn, batch_size=batch_size, dtype=dtype, device=torch.device(device),
                     channels_last=is_conv if channels_last is None else channels_last)
    rows = dict(_rows(model_a, lambda a: lerp_state(state_a, state_b, a), alphas, range(len(alphas)), train,
                      test, bn_split or train, mean, std, s))
    table = {k: np.array([rows[i][k] for i in range(len(alphas))]) for k in results.ROW_FIELDS}
    return results.Curve(
        alpha=alphas, train_loss=table["train/loss"], train_accuracy=table["train/accuracy"],
        train_nonfinite=table["train/nonfinite"].astype(np.int64), test_loss=table["test/loss"],
        test_accuracy=table["test/accuracy"], test_nonfinite=table["test/nonfinite"].astype(np.int64),
        negative_variance=table["bn/negative_variance"].astype(np.int64),
        attrs={"bn_policy": bn if has_batchnorm(model_a) else "none", "label_a": "A", "label_b": "B"},
    )


# ----------------------------------------------------------------------------------------- files / CLI
def run_label(path: Path) -> str:
    """A readable name for a checkpoint: its run directory for generic names (final.pt, last.pt ...)."""
    if path.stem in ("final", "last", "init") or re.fullmatch(r"epoch_\d+", path.stem):
        return path.resolve().parent.name
    return path.stem


def load_data_for(meta: dict[str, Any], data: str | None, train_subset: int | None, test_subset: int | None,
                  subset_seed: int) -> data_mod.Dataset:
    """The data a checkpoint was trained on (its recorded source and subsets) or ``data`` if given, then
    optional further stratified subsets."""
    if data is not None:
        ds = data_mod.load_source(data)
    else:
        ds = data_mod.load_from_spec(meta["data"]["source"])
        for split, sub in meta["data"].get("subset", {}).items():
            ds = ds.subset(**{split: sub["n"]}, seed=sub["seed"])
    if train_subset is not None:
        ds = ds.subset(train=train_subset, seed=subset_seed)
    if test_subset is not None:
        ds = ds.subset(test=test_subset, seed=subset_seed)
    return ds


def _curve_summary(curve: results.Curve) -> str:
    lines = [f"{'alpha':>7} {'train loss':>11} {'train acc':>9} {'test loss':>11} {'test acc':>9} {'nonfinite':>9}"]
    for i, a in enumerate(curve.alpha):
        nf = int(curve.train_nonfinite[i]) + int(curve.test_nonfinite[i])
        lines.append(f"{a:7.3f} {curve.train_loss[i]:11.4g} {curve.train_accuracy[i]:9.4f} "
                     f"{curve.test_loss[i]:11.4g} {curve.test_accuracy[i]:9.4f} {nf:9d}")
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepRequest:
    """Everything ``python -m minima.interpolate`` was asked to do (the library-level entry point)."""

    checkpoint_a: Path
    checkpoint_b: Path | None = None
    alphas: str = DEFAULT_ALPHAS
    bn: str | None = None
    direction: str = "segment"
    direction_seed: int = 0
    data: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    bn_samples: int | None = None
    eval_batch_size: int = 1000
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "float32"
    fold_bn: bool = True
    plot: bool = True
    progress: bool = True


def default_output(req: SweepRequest) -> Path:
    a = run_label(req.checkpoint_a)
    if req.direction == "random":
        return Path(f"{a}_random{req.direction_seed}.h5")
    assert req.checkpoint_b is not None
    return Path(f"{a}_vs_{run_label(req.checkpoint_b)}.h5")


def run(req: SweepRequest) -> Path:
    """Run (or resume) a sweep into an HDF5 curve file and return its path. Works under torchrun."""
    env = distributed.setup(req.device)
    try:
        return _run(req, env)
    finally:
        distributed.teardown()


def _run(req: SweepRequest, env: distributed.DistEnv) -> Path:
    if req.direction not in ("segment", "random"):
        raise ValueError(f"unknown direction {req.direction!r}; choose 'segment' or 'random'")
    if req.direction == "segment" and req.checkpoint_b is None:
        raise ValueError("interpolation needs two checkpoints (ckptA ckptB); for a random direction through "
                         "one checkpoint use --direction random")
    if req.direction == "random" and req.checkpoint_b is not None:
        raise ValueError("--direction random takes one checkpoint, got two")
    if req.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {req.dtype!r}; choose one of {list(DTYPES)}")
    alphas = parse_alphas(req.alphas)
    out = Path(req.out) if req.out is not None else default_output(req)
    if out.suffix != ".h5":
        raise ValueError(f"--out {out} should end in .h5 (an HDF5 curve file)")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist; create it or choose another --out")

    ck_a = ckpt_io.load_checkpoint(req.checkpoint_a)
    ck_b = ckpt_io.load_checkpoint(req.checkpoint_b) if req.checkpoint_b is not None else None
    if ck_b is not None:
        ckpt_io.check_compatible(ck_a, ck_b, str(req.checkpoint_a), str(req.checkpoint_b))
        norm_a = (ck_a["meta"]["data"]["mean"], ck_a["meta"]["data"]["std"])
        norm_b = (ck_b["meta"]["data"]["mean"], ck_b["meta"]["data"]["std"])
        if not np.allclose(norm_a, norm_b, rtol=0, atol=1e-12):
            raise ValueError(f"A was trained with input normalisation mean/std {norm_a}, B with {norm_b}: no single "
                             "input pipeline evaluates θ(α) as both were trained; retrain on the same data")
    model = ckpt_io.model_from_checkpoint(ck_a)
    ds = load_data_for(ck_a["meta"], req.data, req.train_subset, req.test_subset, req.subset_seed)
    mean, std = tuple(ck_a["meta"]["data"]["mean"]), tuple(ck_a["meta"]["data"]["std"])
    check_model_accepts(model, ds)
    bn_split = ds.train
    if req.bn_samples is not None and req.bn_samples < len(ds.train):
        bn_split = ds.train.take(data_mod.stratified_subset(ds.train.labels, req.bn_samples, req.subset_seed))
    with_bn = has_batchnorm(model)
    policy = (req.bn or "recompute") if with_bn else "none"
    if req.bn is not None and req.bn not in BN_POLICIES:
        raise ValueError(f"unknown --bn {req.bn!r}; choose one of {list(BN_POLICIES)}")
    s = EvalSettings(bn=policy if with_bn else "recompute", batch_size=req.eval_batch_size,
                     dtype=DTYPES[req.dtype], device=env.device,
                     channels_last=ck_a["model"]["name"] in CONVOLUTIONAL, fold_bn=req.fold_bn)

    state_a = ck_a["state_dict"]
    if ck_b is not None:
        state_b = ck_b["state_dict"]

        def point(a: float) -> StateDict:
            return lerp_state(state_a, state_b, a)
    else:
        direction = random_direction(model, state_a, req.direction_seed)

        def point(a: float) -> StateDict:
            return shift_state(state_a, direction, a)

    config = {
        "alphas": alphas.tolist(), "bn": policy, "direction": req.direction,
        "direction_seed": req.direction_seed if req.direction == "random" else None,
        "filter_normalized": req.direction == "random", "data": ds.describe(),
        "bn_samples": len(bn_split), "eval_batch_size": req.eval_batch_size, "dtype": req.dtype,
        "fold_bn": req.fold_bn, "world_size": env.world_size,
    }
    config_for_match = {k: v for k, v in config.items() if k != "world_size"}
    identity = {
        "checkpoint_a": str(req.checkpoint_a), "checkpoint_b": str(req.checkpoint_b or ""),
        "sha256_a": ckpt_io.sha256_file(req.checkpoint_a),
        "sha256_b": ckpt_io.sha256_file(req.checkpoint_b) if req.checkpoint_b else "",
        "model": ck_a["model"]["name"], "bn_policy": policy, "config_key": json.dumps(config_for_match, sort_keys=True),
    }

    pending: list[int] = []
    if env.is_main:
        pending = _prepare_output(out, alphas, req, identity, config)
    if env.distributed:
        box = [pending]
        dist.broadcast_object_list(box, src=0)
        pending = box[0]

    if env.is_main and pending:
        print(f"[minima.interpolate] {len(pending)}/{len(alphas)} α points to compute → {out} "
              f"(BN policy {policy}, {len(ds.train)} train / {len(ds.test)} test samples, {env.world_size} rank(s))",
              flush=True)
    for i, row in _rows(model, point, alphas, pending, ds.train, ds.test, bn_split, mean, std, s,
                        env.rank, env.world_size, progress=env.is_main and req.progress):
        if env.is_main:
            results.write_row(out, i, row)

    if env.is_main:
        curve = results.load_curve(out)
        if policy == "interpolate":
            _endpoint_check(out, curve, ck_a, ck_b, ds, mean, std, s)
            curve = results.load_curve(out)
        print(_curve_summary(curve), flush=True)
        if req.plot:
            from minima.plots import save_curve_figure

            png = save_curve_figure(curve, out.with_suffix(".png"))
            print(f"[minima.interpolate] wrote {out} and {png}", flush=True)
        else:
            print(f"[minima.interpolate] wrote {out}", flush=True)
    distributed.barrier()
    return out


def _prepare_output(out: Path, alphas: np.ndarray, req: SweepRequest, identity: dict[str, str],
                    config: dict[str, Any]) -> list[int]:
    """Create the file, or decide which rows an existing one still needs (refusing foreign/mismatched files)."""
    if out.exists() and not req.overwrite:
        if not req.resume:
            try:
                done = results.load_curve(out).complete
            except results.ResultsError as exc:
                raise results.ResultsError(f"{exc} (refusing to overwrite it)") from exc
            state = "complete" if done else "partially computed"
            raise FileExistsError(f"{out} exists and is {state}; pass --resume to compute only missing rows, "
                                  "--overwrite to start again, or choose another --out")
        expected = {k: identity[k] for k in ("sha256_a", "sha256_b", "bn_policy", "config_key")}
        return results.pending_rows(out, alphas, expected)
    attrs = dict(identity, config=json.dumps(config), label_a=run_label(req.checkpoint_a),
                 label_b=run_label(req.checkpoint_b) if req.checkpoint_b else f"random direction (seed "
                 f"{req.direction_seed})")
    results.create_curve_file(out, alphas, attrs)
    return list(range(len(alphas)))


def _endpoint_check(out: Path, curve: results.Curve, ck_a: dict, ck_b: dict | None, ds: data_mod.Dataset,
                    mean: Sequence[float], std: Sequence[float], s: EvalSettings) -> None:
    """With interpolated BN statistics, α = 0 and α = 1 must reproduce checkpoints A and B evaluated as
    they are; store and print the largest relative difference (a validity check of the whole pipeline)."""
    checks: dict[str, Any] = {}
    for alpha, ck, name in ((0.0, ck_a, "a"), (1.0, ck_b, "b")):
        hits = np.flatnonzero(curve.alpha == alpha)
        if ck is None or not len(hits):
            continue
        model = s.place(ckpt_io.model_from_checkpoint(ck))
        diffs = []
        for split_name, split in (("train", ds.train), ("test", ds.test)):
            with s.compute():
                ref: EvalResult = evaluate(model, split, mean, std, batch_size=s.batch_size, device=s.device,
                                           dtype=s.storage_dtype, channels_last=s.channels_last)
            got_loss = getattr(curve, f"{split_name}_loss")[hits[0]]
            got_acc = getattr(curve, f"{split_name}_accuracy")[hits[0]]
            diffs += [abs(got_loss - ref.loss) / max(abs(ref.loss), 1e-12), abs(got_acc - ref.accuracy)]
        checks[f"endpoint_{name}_max_rel_diff"] = float(max(diffs))
    if checks:
        results.set_attrs(out, checks)
        worst = max(checks.values())
        verdict = "OK" if worst <= ENDPOINT_TOLERANCE[s.dtype] else "MISMATCH"
        print(f"[minima.interpolate] endpoint check ({verdict}): α=0/1 vs checkpoints evaluated directly, "
              f"max relative difference {worst:.2e}", flush=True)


def parse_args(argv: Sequence[str] | None = None) -> SweepRequest:
    p = argparse.ArgumentParser(prog="python -m minima.interpolate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint_a", type=Path, help="checkpoint A (α = 0)")
    p.add_argument("checkpoint_b", type=Path, nargs="?", default=None, help="checkpoint B (α = 1)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help="START:STOP:NUM or a comma-separated list")
    p.add_argument("--bn", choices=BN_POLICIES, default=None, help="BatchNorm policy (default recompute)")
    p.add_argument("--direction", choices=("segment", "random"), default="segment",
                   help="segment A→B, or a filter-normalised random direction through A")
    p.add_argument("--direction-seed", type=int, default=0, help="seed of the random direction")
    p.add_argument("--data", default=None, help="override the checkpoints' data (.npz, torchvision root, synthetic)")
    p.add_argument("--train-subset", type=int, default=None, help="stratified training subset size")
    p.add_argument("--test-subset", type=int, default=None, help="stratified test subset size")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--bn-samples", type=int, default=None, help="training samples to re-estimate BN (default all)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=None, help="output .h5 (default <A>_vs_<B>.h5)")
    p.add_argument("--resume", action="store_true", help="compute only the missing rows of --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="bfloat16: autocast preview ≈ 1.8× faster on CPUs with bf16 instructions, losses within "
                        "≈ 1.5e-3 relative of float32 on trained C1 checkpoints")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                   help="do not fold BatchNorm into conv/linear layers for evaluation")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    # intermixed: "A.pt --alphas=... B.pt" works as well as "A.pt B.pt --alphas=..."
    args = p.parse_intermixed_args(_join_negative_grid(list(sys.argv[1:] if argv is None else argv)))
    return SweepRequest(**vars(args))


def _join_negative_grid(argv: list[str]) -> list[str]:
    """``--alphas -1:2:25`` → ``--alphas=-1:2:25``: argparse would read a value starting with '-' as a flag."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--alphas" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--alphas={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    req = parse_args(argv)
    keep_freed_memory()
    try:
        run(req)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"[minima.interpolate] error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("[minima.interpolate] interrupted; finished rows are saved — rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
