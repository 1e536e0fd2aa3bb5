"""The grid runner: what every study whose result is a grid of points in parameter space shares.

A grid study is a set of coordinates (``{axis: values}``) and a point function (a coordinate row → a state dict);
its command module builds a :class:`GridStudy` from a request, and :func:`run_grid` does the rest, the same way for
the α line, the plane and any later shape:

validate and prepare on every rank (a refusal on any rank is raised on every rank: one line, exit 2, no hang) →
on rank 0 create the grid file or check what an existing one still needs (``--resume``/``--overwrite``), print what
will run with a time estimate (and ask or refuse above a limit, where the study asks for it), broadcast the pending
points *or the refusal* → evaluate the points, dealt to the ranks in rounds → rank 0 writes each point as soon as it
is known (the file opened once, flushed per point) → summary, figure and the study's own final check on rank 0.

Every point is evaluated by :func:`minima.geometry.points.evaluate_point` (exact loss, explicit BatchNorm policy).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from minima.core import distributed
from minima.core.cli import duration
from minima.core.config import resume_key, setting
from minima.core.options import CheckpointData
from minima.core.precision import effective as precision_effective
from minima.core.precision import float32_math
from minima.core.vocab import TORCH_DTYPES, BNPolicy, BNRecord, DataOnDevice, Dtype, Loss, check_choice
from minima.data import Dataset, place, stratified_subset
from minima.files import results
from minima.files.naming import check_output
from minima.geometry.barriers import barriers
from minima.geometry.barriers import describe as describe_barriers
from minima.geometry.directions import StateDict, bn_buffer_names
from minima.geometry.points import EvalData, EvalSettings, evaluate_point
from minima.models import has_batchnorm, is_convolutional

PointFn = Callable[[np.ndarray], StateDict]
#: A grid request type (a subclass of :class:`~minima.core.options.EvalOptions`).
R = TypeVar("R", bound="EvalOptions")


@dataclass(frozen=True, kw_only=True)
class EvalOptions(CheckpointData):
    """How the points of any grid are evaluated, and where the results go: the settings every grid command shares
    (:class:`minima.studies.interpolate.SweepRequest`, :class:`minima.studies.surface.SurfaceRequest`)."""

    bn: BNPolicy | None = setting(None, "BatchNorm policy at each point of the path or plane",
                                  default_text="recompute for models with BatchNorm")
    bn_samples: int | None = setting(None, "training samples BatchNorm statistics are re-estimated on",
                                     unit="samples", default_text="the whole (sub)set")
    resume: bool = setting(False, "compute only the points an existing --out still lacks", switch=True)
    overwrite: bool = setting(False, "replace an existing --out", switch=True)
    dtype: Dtype = setting("float32", "evaluation precision; bfloat16 is an autocast preview (parameters, "
                           "BatchNorm statistics and sums stay float32/float64)")
    fold_bn: bool = setting(True, "fold eval-mode BatchNorm into the preceding conv/linear layer (exact)")
    data_on_device: DataOnDevice = setting("auto", "keep the evaluated data on the compute device (auto: when it "
                                           "takes at most half its free memory) or in pinned host memory (no)")
    plot: bool = setting(True, "draw <out>.png beside the file")
    progress: bool = setting(True, "progress bar on rank 0")


def parse_axis(text: str, what: str = "α") -> np.ndarray:
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


def check_options(req: EvalOptions, out: Path) -> Path:
    """The shared options' own checks and the output path's: ``.h5``, an existing directory, not both
    ``--resume`` and ``--overwrite``."""
    check_choice("dtype", req.dtype, Dtype)
    if req.bn is not None:
        check_choice("BatchNorm policy (--bn)", req.bn, BNPolicy)
    if req.resume and req.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume keeps the finished points of "
                         "--out, --overwrite discards them; pass one")
    return check_output(out, "an HDF5 grid file")


def evaluation_setup(req: EvalOptions, model: nn.Module, ds: Dataset, recorded: dict[str, Any],
                     device: torch.device, loss: Loss = "cross_entropy",
                     ) -> tuple[BNRecord, EvalSettings, EvalData, dict[str, Any]]:
    """What every grid point is evaluated with: the BatchNorm policy (``none`` for a model without BatchNorm), the
    settings, the (placed) data with the BN re-estimation subset, and what every grid file records about it —
    ``data`` (the data description with its chain of subsets, and the BN subset drawn from the training split),
    ``precision``, ``data_placement`` and ``loss``. ``recorded``: the checkpoint's ``meta["data"]`` (its
    normalisation); ``loss``: the loss it was trained with."""
    bn_split, bn_subset = ds.train, None
    if req.bn_samples is not None and req.bn_samples < len(ds.train):
        bn_split = ds.train.take(stratified_subset(ds.train.labels, req.bn_samples, req.subset_seed))
        bn_subset = {"n": int(req.bn_samples), "seed": int(req.subset_seed)}
    with_bn = has_batchnorm(model)
    policy: BNRecord = (req.bn or "recompute") if with_bn else "none"
    s = EvalSettings(bn=policy if with_bn else "recompute", batch_size=req.eval_batch_size,
                     dtype=TORCH_DTYPES[req.dtype], device=device, channels_last=is_convolutional(model),
                     fold_bn=req.fold_bn, loss=loss)
    (train, test, bn_data), placement = place([ds.train, ds.test, bn_split], req.data_on_device, device)
    record = {"policy": policy, "data": {**ds.describe(), "bn_subset": bn_subset},
              "precision": precision_effective(device, req.float32_math,
                                               "bfloat16" if req.dtype == "bfloat16" else None),
              "data_placement": placement.describe(), "loss": loss}
    return policy, s, EvalData(train, test, bn_data, tuple(recorded["mean"]), tuple(recorded["std"])), record


@dataclass
class GridStudy:
    """What a grid command hands :func:`run_grid`: where, which points, how to evaluate them, what to record.

    ``attrs``: root attributes of a new file; ``expected``: what an existing file must share to be resumed
    (``config`` compared field by field); ``what``: how the announcement names the study; ``confirm(seconds,
    points)``: may refuse a grid estimated too long; ``summary(grid)``: the text printed at the end; ``figure(grid,
    path)``: draws the figure; ``check(path, grid)``: a final check on rank 0 (may raise)."""

    command: str
    out: Path
    coords: dict[str, np.ndarray]
    point: PointFn
    model: nn.Module
    settings: EvalSettings
    data: EvalData
    attrs: dict[str, Any]
    expected: dict[str, Any]
    what: str
    summary: Callable[[results.Grid], str]
    figure: Callable[[results.Grid, Path], Path]
    confirm: Callable[[float, int], None] | None = None
    check: Callable[[Path, results.Grid], None] | None = None


def run_grid(req: R, prepare: Callable[[R, distributed.DistEnv], GridStudy],
             shared: tuple[type[Exception], ...] = ()) -> Path:
    """Run (or resume) the grid study ``prepare(req, env)`` builds into its HDF5 grid file and return the path;
    under torchrun the points are dealt to the ranks. ``shared``: exception types of the final check that every
    rank raises (with rank 0's message) besides refusals."""
    with distributed.session(req.device) as env, float32_math(req.float32_math):
        study = distributed.agree(env, lambda: prepare(req, env))
        pending, created = distributed.from_main(env, lambda: _open(study, req, env))
        written = 0
        try:
            with results.GridWriter(study.out) if env.is_main else contextlib.nullcontext() as writer:
                for i, row in sweep_points(study.model, study.point, results.grid_points(study.coords), pending,
                                           study.data, study.settings, env, progress=env.is_main and req.progress):
                    if writer is not None:
                        writer.write(i, row)
                        written += 1
        except BaseException:
            if env.is_main and created and written == 0:  # nothing finished: leave no new file behind
                study.out.unlink(missing_ok=True)
            raise
        distributed.from_main(env, lambda: _finish(study, req), also=shared)
    return study.out


def pending_in(out: Path, coords: dict[str, np.ndarray], *, resume: bool, overwrite: bool,
               expected: dict[str, Any]) -> list[int] | None:
    """Which points of ``out`` still need computing — checks only, nothing written: ``None`` when the file is to be
    created (it does not exist, or ``overwrite``); an existing file is refused unless ``resume``, and on resume it
    must hold the same grid and the ``expected`` attributes."""
    if not out.exists() or overwrite:
        return None
    if not resume:
        try:
            done = results.load_grid(out).complete
        except results.ResultsError as exc:
            raise results.ResultsError(f"{exc} (refusing to overwrite it)") from exc
        state = "complete" if done else "partially computed"
        raise FileExistsError(f"{out} exists and is {state}; pass --resume to compute only missing points, "
                              "--overwrite to start again, or choose another --out")
    return results.pending_points(out, coords, expected)


def _open(study: GridStudy, req: EvalOptions, env: distributed.DistEnv) -> tuple[list[int], bool]:
    """Rank 0: check the output once, announce the work with its estimate, let the study refuse it, then create the
    file (a refusal before this point leaves no file). Returns the points to compute and whether the file is new
    (did not exist before: only then may a run that finishes no point remove it)."""
    existed = study.out.exists()
    pending = pending_in(study.out, study.coords, resume=req.resume, overwrite=req.overwrite,
                         expected=study.expected)
    total = len(results.grid_points(study.coords))
    todo = list(range(total)) if pending is None else pending
    if todo:
        seconds = estimate_seconds(study.model, study.data, study.settings, len(todo)) / env.world_size
        print(f"[{study.command}] {len(todo)}/{total} points to compute → {study.out} ({study.what}, BN policy "
              f"{study.attrs['bn_policy']}, {len(study.data.train)} train / {len(study.data.test)} test samples, "
              f"{env.world_size} rank(s)); estimated {duration(seconds)}", flush=True)
        if study.confirm is not None:
            study.confirm(seconds, len(todo))
    if pending is None:
        results.create_grid_file(study.out, study.coords, study.attrs)
    return todo, pending is None and not existed


def _finish(study: GridStudy, req: EvalOptions) -> None:
    grid = results.load_grid(study.out)
    print(study.summary(grid), flush=True)
    written = [study.out, study.figure(grid, study.out.with_suffix(".png"))] if req.plot else [study.out]
    print(f"[{study.command}] wrote {' and '.join(map(str, written))}", flush=True)
    if study.check is not None:
        study.check(study.out, grid)


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
    bar = tqdm(total=len(indices), disable=None if progress else True, desc="points", dynamic_ncols=True)
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


def in_memory(model: nn.Module, point: PointFn, coords: dict[str, np.ndarray], d: EvalData,
              s: EvalSettings) -> dict[str, np.ndarray]:
    """Every point of a grid of models in memory (no file): field → grid-shaped array."""
    rows = results.grid_points(coords)
    points = dict(sweep_points(model, point, rows, range(len(rows)), d, s))
    shape = tuple(len(c) for c in coords.values())
    return {k: np.array([points[i][k] for i in range(len(rows))]).reshape(shape) for k in results.POINT_FIELDS}


def estimate_seconds(model: nn.Module, d: EvalData, s: EvalSettings, points: int) -> float:
    """Seconds the grid will take: ``points`` × images per point (train + test + BN re-estimation) at the speed of
    one evaluation batch of the real size on this device (the faster of two timed batches, after a warm-up: a
    smaller batch would time the per-batch overhead, not the images)."""
    split = d.train.take(torch.arange(min(len(d.train), s.batch_size)))
    work = s.place(copy.deepcopy(model))
    s.evaluate(work, split, d.mean, d.std, batch_size=len(split))
    timed = []
    for _ in range(2):
        t0 = time.perf_counter()
        s.evaluate(work, split, d.mean, d.std, batch_size=len(split))
        timed.append(time.perf_counter() - t0)
    per_image = min(timed) / len(split)
    recompute = s.bn == "recompute" and bool(bn_buffer_names(work))
    images = len(d.train) + len(d.test) + (len(d.bn_split) if recompute else 0)
    return points * images * per_image


def confirm_limit(command: str, max_minutes: float, yes: bool,
                  ask: Callable[[str], str] = input) -> Callable[[float, int], None]:
    """A ``GridStudy.confirm``: above ``max_minutes`` ask on a terminal, refuse elsewhere unless ``yes``."""
    def confirm(estimate_s: float, points: int) -> None:
        if estimate_s <= 60 * max_minutes or yes:
            return
        what = (f"the grid of {points} points is estimated at {duration(estimate_s)} (over --max-minutes "
                f"{max_minutes:g})")
        if sys.stdin is not None and sys.stdin.isatty():
            if ask(f"[{command}] {what}; continue? [y/N] ").strip().lower() in ("y", "yes"):
                return
            raise ValueError(f"{what}; not started")
        raise ValueError(f"{what}; pass --yes to run it anyway, or use a smaller grid (--x/--y) or subsets "
                         "(--train-subset/--test-subset/--bn-samples)")
    return confirm


def recorded_attrs(record: dict[str, Any], config: dict[str, Any], request: dict[str, Any],
                   identity: dict[str, Any]) -> dict[str, Any]:
    """The root attributes every grid file records: ``identity`` (checkpoints, hashes, model, BN policy, …),
    ``config`` (the effective settings) and its resume key (without the world size), the resolved ``request``,
    ``precision`` and ``data_placement``."""
    match = {k: v for k, v in config.items() if k != "world_size"}
    return {**identity, "bn_policy": record["policy"], "config": json.dumps(config), "config_key": resume_key(match),
            "request": json.dumps(request), "precision": json.dumps(record["precision"]),
            "data_placement": json.dumps(record["data_placement"]), "loss": record.get("loss", "cross_entropy")}


def curve_table(curve: results.Curve, axis: str, command: str, with_barriers: bool = True) -> str:
    """The text a one-axis study prints at its end: per point (``axis``: α or t) the train/test loss and accuracy
    and the count of non-finite per-sample losses, then the barriers against the endpoints' line (``with_barriers``;
    not along a random direction)."""
    lines = [f"{axis:>7} {'train loss':>11} {'train acc':>9} {'test loss':>11} {'test acc':>9} {'nonfinite':>9}"]
    for i, a in enumerate(curve.alpha):
        nf = int(curve.train_nonfinite[i]) + int(curve.test_nonfinite[i])
        lines.append(f"{a:7.3f} {curve.train_loss[i]:11.4g} {curve.train_accuracy[i]:9.4f} "
                     f"{curve.test_loss[i]:11.4g} {curve.test_accuracy[i]:9.4f} {nf:9d}")
    found = describe_barriers(barriers(curve)) if with_barriers else ""
    return "\n".join([*lines, *([f"[{command}] {found}"] if found else [])])
