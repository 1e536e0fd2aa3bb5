"""Trained curves between two minima (Garipov et al. 2018) and the evaluation of any path θ(t) on the grid runner.

Training: the bends of a Bézier curve or polygonal chain (:mod:`minima.geometry.curves`) between fixed endpoints A
and B are trained as Garipov et al. do: one t ~ U(0, 1) per optimiser step (the same on every rank), loss = the
endpoints' training loss (cross-entropy or MSE, as recorded) at θ(t) + ½·wd·‖θ(t)‖² over its parameters, BatchNorm
in batch mode, SGD with momentum. The loop has the trainer's habits (:mod:`minima.optim.steps`): data placed once
(:func:`minima.data.placement.place`), every step seeded from (seed, step, rank), gradients all-reduced across
torchrun ranks, a bar per epoch on rank 0, an estimate after the first epoch, ``last.pt`` at every epoch end and on
SIGTERM/SIGINT (then :class:`~minima.optim.steps.TrainingInterrupted`), and ``--resume`` continuing bit for bit.
The result is ``curve.pt`` in the curve's directory: a curve checkpoint
(:func:`minima.files.checkpoint.make_curve_checkpoint`) naming its endpoints by path and sha256.

Evaluation: a path through state dicts (the curve: A, bends, B; the straight line: A, B as a chain without bends)
is a one-axis grid (axis ``t``) on :mod:`minima.studies.grid`, BatchNorm re-estimated at every t by default, with
the barriers of :mod:`minima.geometry.barriers` against the endpoints' straight line.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from minima.core import distributed
from minima.core.cli import duration
from minima.core.config import setting, to_dict
from minima.core.vocab import AlignMethod, Amp, CurveKind, ScheduleKind, check_choice
from minima.data import (
    Dataset,
    augment,
    load_for_checkpoint,
    normalize,
    place,
)
from minima.figures import save_curve_figure
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.files.naming import run_label
from minima.geometry.barriers import barriers
from minima.geometry.curves import coefficients, combine, initial_bends, point_on_curve
from minima.geometry.directions import StateDict
from minima.geometry.evaluate import batch_sums, check_model_accepts, per_sample_loss, recorded_loss
from minima.optim.schedule import build_schedule
from minima.optim.steps import step_seed, stop_on_signals
from minima.studies.grid import (
    EvalOptions,
    GridStudy,
    check_options,
    curve_table,
    evaluation_setup,
    parse_axis,
    recorded_attrs,
)
from minima.studies.loop import TrainState, epoch_batches, plan_batches, run_epoch

# the settings that define a curve's training: a resumed run must share them
TRAINING_KEYS = ("checkpoint_a", "checkpoint_b", "curve", "bends", "epochs", "batch_size", "lr", "momentum",
                 "weight_decay", "schedule", "seed", "train_subset", "subset_seed", "data", "augment", "amp")
# settings a curve checkpoint written before they existed was trained with (a resume compares against these)
TRAINING_DEFAULTS = {"augment": False, "amp": "none"}


@dataclass(frozen=True)
class CurveRequest(EvalOptions):
    """Everything ``python -m minima.curve`` can be asked to do (recorded in the curve checkpoint and grid files)."""

    checkpoint_a: Path | None = setting(None, "checkpoint A (t = 0)", positional=True)
    checkpoint_b: Path | None = setting(None, "checkpoint B (t = 1)", positional=True)
    evaluate: Path | None = setting(None, "evaluate this curve checkpoint (curve.pt) instead of training one",
                                    default_text="train a curve between A and B")
    curve: CurveKind = setting("bezier", "Bézier curve (Bernstein polynomials) or polygonal chain through the bends")
    bends: int = setting(1, "trained bends (1 Bézier bend: Garipov's quadratic curve)")
    epochs: int = setting(20, "training epochs", unit="epochs")
    batch_size: int = setting(128, "global mini-batch size (one t per mini-batch)", unit="samples")
    lr: float = setting(0.015, "peak SGD learning rate (Garipov et al.'s for VGG16)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "wd of the penalty ½·wd·‖θ(t)‖² on the curve's point")
    schedule: ScheduleKind = setting("cosine", "learning-rate schedule over the epochs")
    seed: int = setting(0, "seed of the shuffles, the t of every step, dropout and augmentation")
    micro_batch: int | None = setting(None, "largest per-rank forward batch; gradients are accumulated above it "
                                      "(the same curve, less memory)", unit="samples",
                                      default_text="the per-rank batch")
    augment: bool = setting(False, "random crop (pad 4) + horizontal flip of the training images (Garipov et al. "
                            "train their curves with it)")
    amp: Amp = setting("none", "bf16: CUDA autocast of the curve's forward passes")
    align: bool = setting(False, "align B to A first (python -m minima.align) and train the curve between A and the "
                          "aligned B", switch=True)
    resume: bool = setting(False, "continue an interrupted curve training from its last.pt (bit for bit), then "
                           "compute only the grid points the curve's files still lack", switch=True)
    align_method: AlignMethod = setting("weights", "alignment method with --align: weight matching or activation "
                                        "matching (minima.align --method)")
    t: str = setting("0:1:21", "t grid the curve and the lines are evaluated on: START:STOP:NUM or a list in [0, 1]")
    out: Path | None = setting(None, "the curve's directory", default_text="<A>_curve_<B>/ beside A")


def curve_dir(req: CurveRequest) -> Path:
    """Where the curve's files go: ``--out``, or ``<A>_curve_<B>/`` beside A (for ``--evaluate``: the curve's own
    directory)."""
    if req.out is not None:
        return Path(req.out)
    if req.evaluate is not None:
        return Path(req.evaluate).parent
    assert req.checkpoint_a is not None and req.checkpoint_b is not None
    return Path(req.checkpoint_a).parent / f"{run_label(req.checkpoint_a)}_curve_{run_label(req.checkpoint_b)}"


def check_request(req: CurveRequest) -> np.ndarray:
    """The request's own checks (before any file is touched); returns the t grid."""
    if req.evaluate is not None:
        if req.checkpoint_a is not None or req.checkpoint_b is not None:
            raise ValueError("--evaluate takes the curve checkpoint alone (its endpoints are recorded in it)")
    elif req.checkpoint_a is None or req.checkpoint_b is None:
        raise ValueError("a curve needs two checkpoints (A.pt B.pt), or --evaluate curve.pt")
    check_choice("curve", req.curve, CurveKind)
    check_choice("schedule", req.schedule, ScheduleKind)
    for name, value, low in (("--bends", req.bends, 0), ("--epochs", req.epochs, 1),
                             ("--batch-size", req.batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} {value} must be ≥ {low}")
    if req.lr <= 0 or req.weight_decay < 0 or not 0 <= req.momentum < 1:
        raise ValueError("need --lr > 0, --weight-decay ≥ 0 and 0 ≤ --momentum < 1")
    ts = parse_axis(req.t, "t")
    if ts.min() < 0 or ts.max() > 1:
        raise ValueError(f"t grid {req.t!r} leaves [0, 1]; a curve is defined for 0 ≤ t ≤ 1")
    ckpt_io.check_inputs([req.checkpoint_a, req.checkpoint_b, req.evaluate])
    check_options(req, curve_dir(req).parent / "curve.h5")  # the shared flags, and a directory to create it in
    return ts


def load_endpoints(a: Path, b: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both endpoint checkpoints, checked to share one architecture and one input normalisation."""
    ck_a, ck_b = ckpt_io.load_checkpoint(a), ckpt_io.load_checkpoint(b)
    ckpt_io.check_compatible(ck_a, ck_b, str(a), str(b))
    ckpt_io.check_same_normalisation(ck_a, ck_b, str(a), str(b))
    return ck_a, ck_b


def _training_settings(req: CurveRequest) -> dict[str, Any]:
    d = to_dict(req)
    return {k: d[k] for k in TRAINING_KEYS}


# ------------------------------------------------------------------------------------------------- training
def train_curve(req: CurveRequest, on_step: Any = None) -> Path:
    """Train (or with ``resume`` continue) the curve ``req`` asks for; returns ``curve.pt``. An existing finished
    curve is reused on ``resume``, replaced on ``overwrite``, refused otherwise. ``on_step(step)`` is called after
    every optimiser step (a user's hook) with a :class:`minima.studies.loop.TrainState`."""
    with distributed.session(req.device) as env:
        return _train_curve(req, env, on_step)


def _train_curve(req: CurveRequest, env: distributed.DistEnv, on_step: Any) -> Path:
    check_request(req)
    assert req.checkpoint_a is not None and req.checkpoint_b is not None
    folder = curve_dir(req)
    final, last = folder / "curve.pt", folder / "last.pt"
    state = distributed.agree(env, lambda: _resume_state(req, final, last))
    if state == "done":
        if env.is_main:
            print(f"[minima.curve] {final} is already trained with these settings; evaluating it", flush=True)
        return final
    ck_a, ck_b = load_endpoints(req.checkpoint_a, req.checkpoint_b)
    model = ckpt_io.model_from_checkpoint(ck_a, req.trust_import)
    ds = load_for_checkpoint(ck_a["meta"]["data"], req.data, req.train_subset, req.test_subset, req.subset_seed,
                             req.data_root, mode=req.subset_mode)
    check_model_accepts(model, ds)
    trainer = _Trainer(req, env, model, ds, ck_a["state_dict"], ck_b["state_dict"], recorded_loss(ck_a["meta"]))
    if isinstance(state, dict):
        trainer.restore(state)
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    trainer.endpoints = [{"path": str(Path(p).resolve()), "sha256": ckpt_io.sha256_file(p)}
                         for p in (req.checkpoint_a, req.checkpoint_b)]
    trainer.model_spec = dict(ck_a["model"])
    return trainer.run(final, last, on_step)


def _resume_state(req: CurveRequest, final: Path, last: Path) -> dict[str, Any] | str | None:
    """``None`` (start), ``"done"`` (a finished curve with these settings, on ``--resume``) or ``last.pt``'s
    contents (continue); refuses existing files without ``--resume``/``--overwrite`` and settings that differ."""
    exists = [p for p in (final, last) if p.exists()]
    if not exists or req.overwrite:
        return None
    if not req.resume:
        raise FileExistsError(f"{exists[0]} exists; pass --resume to continue or reuse it, --overwrite to train "
                              "again, or choose another --out")
    source = final if final.exists() else last
    ck = ckpt_io.load_curve_checkpoint(source)
    recorded = ck["meta"]["training"]
    wanted = _training_settings(req)
    recorded = {**TRAINING_DEFAULTS, **recorded}
    changed = [f"{k}: {recorded.get(k)!r} → {wanted[k]!r}" for k in TRAINING_KEYS if recorded.get(k) != wanted[k]]
    if changed:
        raise ValueError(f"{source} was trained with other settings ({'; '.join(changed)}); pass them as recorded "
                         "to resume, or --overwrite to train again")
    return "done" if source == final else ck


class _Trainer:
    """One curve training run: fixed endpoints, trainable bends, optimiser, schedule and data, and its position."""

    def __init__(self, req: CurveRequest, env: distributed.DistEnv, model: nn.Module, ds: Dataset,
                 state_a: StateDict, state_b: StateDict, loss: str = "cross_entropy") -> None:
        self.req, self.env, self.model, self.ds, self.loss = req, env, model.to(env.device), ds, loss
        self.param_keys = [k for k, _ in model.named_parameters()]
        dev = env.device
        self.ends = [{k: state_a[k].to(dev) for k in self.param_keys}, {k: state_b[k].to(dev) for k in self.param_keys}]
        self.buffers = {k: v.to(dev).clone() for k, v in state_a.items() if k not in self.param_keys}
        self.bends = [{k: nn.Parameter(v[k].to(dev).clone()) for k in self.param_keys}
                      for v in initial_bends(state_a, state_b, req.bends)]
        self.plan = plan_batches(req.batch_size, env.world_size, req.micro_batch, len(ds.train))
        if req.amp == "bf16" and dev.type != "cuda":
            raise ValueError("--amp bf16 is supported on CUDA only; use --amp none on CPU")
        self.schedule = build_schedule(ref_lr=req.lr, ref_batch=req.batch_size, global_batch=req.batch_size,
                                       scaling="none", warmup_epochs=0.0, kind=req.schedule, milestones_epochs=(),
                                       gamma=0.1, epochs=req.epochs, steps_per_epoch=self.plan.steps_per_epoch)
        self.optimizer = torch.optim.SGD([p for b in self.bends for p in b.values()], lr=req.lr,
                                         momentum=req.momentum)
        (self.train_split,), self.placement = place([ds.train], req.data_on_device, dev)
        self.epoch, self.batch0, self.step = 0, 0, 0
        self.carried = torch.zeros(4, dtype=torch.float64)
        self.history: list[dict[str, Any]] = []
        self.endpoints: list[dict[str, str]] = []
        self.model_spec: dict[str, Any] = {}
        self.fetched: Any = None  # the current epoch's batches (an iterator)
        self.last_path = Path("last.pt")  # where an interrupted epoch is saved (set per epoch)

    def restore(self, ck: dict[str, Any]) -> None:
        with torch.no_grad():
            for mine, saved in zip(self.bends, ck["bends"], strict=True):
                for k, p in mine.items():
                    p.copy_(saved[k])
        self.optimizer.load_state_dict(ck["optimizer"])
        pos = ck["position"]
        self.epoch, self.batch0, self.step = pos["epoch"], pos["batch"], ck["meta"]["step"]
        self.carried = ck["epoch_sums"].to(torch.float64)
        self.history = list(ck["meta"]["history"])
        self.buffers = {k: ck["bends"][0][k].to(self.env.device).clone() for k in self.buffers}

    def point(self, t: float) -> dict[str, torch.Tensor]:
        """θ(t) of the parameters (differentiable in the bends)."""
        return combine([self.ends[0], *self.bends, self.ends[1]], coefficients(self.req.curve, self.req.bends, t))

    def checkpoint(self, resumable: bool, epoch_sums: torch.Tensor | None = None) -> dict[str, Any]:
        bends = [{**{k: p.detach() for k, p in b.items()}, **self.buffers} for b in self.bends]
        meta = {"epoch": self.epoch, "step": self.step, "training": _training_settings(self.req),
                "history": self.history, "data": self.ds.describe(), "world_size": self.env.world_size,
                "data_placement": self.placement.describe(), "torch_version": str(torch.__version__)}
        curve = {"kind": self.req.curve, "bends": self.req.bends, "endpoints": self.endpoints}
        extra: dict[str, Any] = {}
        if resumable:
            extra = {"optimizer": self.optimizer.state_dict(), "position": {"epoch": self.epoch, "batch": self.batch0},
                     "epoch_sums": epoch_sums}
        return ckpt_io.make_curve_checkpoint(self.model_spec, curve, bends, meta, **extra)

    def run(self, final: Path, last: Path, on_step: Any) -> Path:
        req, env = self.req, self.env
        if env.is_main:
            print(f"[minima.curve] training a {req.curve} curve with {req.bends} bend(s) between "
                  f"{run_label(self.endpoints[0]['path'])} and {run_label(self.endpoints[1]['path'])}: "
                  f"{req.epochs} epochs × {self.plan.steps_per_epoch} steps of {req.batch_size} images "
                  f"({len(self.ds.train)} train), {env.world_size} rank(s), from epoch {self.epoch + 1}", flush=True)
        with stop_on_signals() as stop:
            first = True
            while self.epoch < req.epochs:
                t0 = time.perf_counter()
                sums = self._epoch(stop, last, on_step)
                total = distributed.all_reduce_sum(sums).cpu() + self.carried
                self.carried = torch.zeros(4, dtype=torch.float64)
                loss, acc = float(total[0] / max(total[2], 1)), float(total[1] / max(total[2], 1))
                self.epoch, self.batch0 = self.epoch + 1, 0
                self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": loss, "train_accuracy": acc})
                if env.is_main:
                    ckpt_io.save_checkpoint(self.checkpoint(True, torch.zeros(4, dtype=torch.float64)), last)
                    took = time.perf_counter() - t0
                    left = req.epochs - self.epoch
                    tqdm.write(f"[minima.curve] epoch {self.epoch}/{req.epochs}: loss at random t {loss:.4f}, "
                               f"accuracy {acc:.4f} ({took:.1f} s)"
                               + (f"; estimated {duration(left * took)} for the remaining {left}" if first and left
                                  else ""))
                first = False
        if env.is_main:
            ckpt_io.save_checkpoint(self.checkpoint(False), final)
            print(f"[minima.curve] wrote {final}", flush=True)
        distributed.barrier()
        return final

    def _epoch(self, stop: dict[str, int | None], last: Path, on_step: Any) -> torch.Tensor:
        """One epoch from ``self.batch0`` on the one training loop (:func:`minima.studies.loop.run_epoch`)."""
        req = self.req
        batches, self.fetched = epoch_batches(self.train_split, self.placement, req.seed, self.epoch, req.batch_size,
                                              self.plan, self.batch0, self.env)
        self.last_path = last
        self.model.train()  # BatchNorm on each batch's statistics, dropout on
        sums, _ = run_epoch(self, self.batch0, batches, stop, str(last), on_step,
                            f"curve epoch {self.epoch + 1}/{req.epochs}", req.progress)
        return sums

    # the one training loop's task (minima.studies.loop.Task)
    @property
    def seed(self) -> int:
        return self.req.seed

    @property
    def epochs(self) -> int:
        return self.req.epochs

    def train_step(self, batch: int, seed: int, sums: torch.Tensor) -> None:
        """One step: one t for the global batch (drawn from the step's rank-0 seed, the same on every rank), the
        point θ(t) of the curve, the run's loss plus the penalty ½·wd·‖θ(t)‖², gradients into the bends (averaged
        over the ranks as DDP does), an SGD step. Above ``--micro-batch`` the rank's batch is cut into micro-batches
        whose gradients add up (the penalty counted once); ``--augment`` crops and flips each micro-batch on the
        device from the step's seed, as the network trainer does."""
        req, env = self.req, self.env
        t = float(torch.rand(1, generator=torch.Generator().manual_seed(step_seed(req.seed, self.step, 0))))
        aug_gen = torch.Generator().manual_seed(seed)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if req.amp == "bf16" else contextlib.nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(self.plan.accumulation):
            x, y = next(self.fetched)
            if req.augment:
                x = augment(x, aug_gen)
            x = normalize(x, self.ds.mean, self.ds.std, torch.float32)
            theta = self.point(t)
            with autocast:
                logits = functional_call(self.model, {**theta, **self.buffers}, (x,))
            # averaged over the ranks (as DDP does): the mean loss of the global batch plus the penalty
            loss = per_sample_loss(logits.float(), y, self.loss).sum() * (env.world_size / req.batch_size)
            if m == 0:
                loss = loss + 0.5 * req.weight_decay * sum((v * v).sum() for v in theta.values())
            loss.backward()
            sums += batch_sums(logits.detach().float(), y, self.loss)
        if env.distributed:
            self._reduce_gradients()
        self.optimizer.step()

    def after_step(self, batch: int, batches: int, lr: float) -> None:
        """A curve has no step callbacks of its own."""

    def save_interrupted(self, sums: torch.Tensor, batch: int) -> None:
        total = distributed.all_reduce_sum(sums).cpu() + self.carried
        self.batch0 = batch
        if self.env.is_main:
            ckpt_io.save_checkpoint(self.checkpoint(True, total), self.last_path)

    def resume_hint(self) -> str:
        return "the same command with --resume"

    def state(self, batch: int, lr: float) -> TrainState:
        return TrainState(epoch=self.epoch, batch=batch, step=self.step, lr=lr, optimizer=self.optimizer,
                          env=self.env)

    def _reduce_gradients(self) -> None:
        grads = [p.grad for b in self.bends for p in b.values()]
        flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / self.env.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class PathSpec:
    """A path to evaluate: the state dicts it runs through (A, bends…, B), its kind, where its grid file goes,
    what it is called, and what its file records about where it came from."""

    points: list[StateDict]
    kind: CurveKind
    out: Path
    label: str
    identity: dict[str, Any]
    loss: str = "cross_entropy"


def evaluate_path(req: CurveRequest, path: PathSpec, model: nn.Module, ds: Dataset, recorded: dict[str, Any],
                  env: distributed.DistEnv) -> GridStudy:
    """The grid study of ``path`` on the t grid of ``req`` (for :func:`minima.studies.grid.run_grid`)."""
    ts = check_request(req)
    check_options(req, path.out)
    check_model_accepts(model, ds)
    policy, s, d, record = evaluation_setup(req, model, ds, recorded, env.device, path.loss)
    config = {"t": ts.tolist(), "curve": path.kind, "bends": len(path.points) - 2, "bn": policy,
              "data": record["data"], "bn_samples": len(d.bn_split), "eval_batch_size": req.eval_batch_size,
              "dtype": req.dtype, "fold_bn": req.fold_bn, "world_size": env.world_size,
              "float32_math": req.float32_math}
    attrs = recorded_attrs(record, config, to_dict(req), path.identity)
    expected = {k: v for k, v in path.identity.items() if k.startswith("sha256")}
    expected.update(bn_policy=policy, config={k: v for k, v in config.items() if k != "world_size"})
    points = path.points

    def point(c: np.ndarray) -> StateDict:
        return point_on_curve(points, path.kind, float(c[0]))

    def check(out: Path, grid: results.Grid) -> None:
        found = barriers(results.grid_curve(grid))
        if found:
            results.set_attrs(out, found)

    return GridStudy(
        command="minima.curve", out=path.out, coords={"t": ts}, point=point, model=model, settings=s, data=d,
        attrs=attrs, expected=expected, what=path.label,
        summary=lambda grid: curve_table(results.grid_curve(grid), "t", "minima.curve"),
        figure=lambda grid, out: save_curve_figure(results.grid_curve(grid), out), check=check)


def line_path(ck_a: dict[str, Any], ck_b: dict[str, Any], a: Path, b: Path, out: Path, label: str) -> PathSpec:
    """The straight line between two checkpoints (a chain without bends; t = α)."""
    identity = {"checkpoint_a": str(a), "checkpoint_b": str(b), "sha256_a": ckpt_io.sha256_file(a),
                "sha256_b": ckpt_io.sha256_file(b), "model": ck_a["model"]["name"], "label_a": run_label(a),
                "label_b": run_label(b), "path_kind": label}
    return PathSpec([ck_a["state_dict"], ck_b["state_dict"]], "polychain", out, label, identity,
                    recorded_loss(ck_a["meta"]))


def curve_paths(req: CurveRequest, curve_file: Path) -> tuple[list[PathSpec], nn.Module, Dataset, dict[str, Any]]:
    """The curve of ``curve_file`` and the straight line between its endpoints, ready to evaluate (the endpoints
    must be the files the curve was trained between: same sha256), with the model, data and the data record."""
    ck = ckpt_io.load_curve_checkpoint(curve_file)
    ends = ck["curve"]["endpoints"]
    for end in ends:
        if not Path(end["path"]).is_file():
            raise FileNotFoundError(f"the curve's endpoint {end['path']} is missing; the curve cannot be evaluated")
        if ckpt_io.sha256_file(end["path"]) != end["sha256"]:
            raise ValueError(f"the curve's endpoint {end['path']} changed since the curve was trained (sha256 "
                             "differs); train the curve again")
    ck_a, ck_b = load_endpoints(Path(ends[0]["path"]), Path(ends[1]["path"]))
    model = ckpt_io.model_from_checkpoint(ck_a, req.trust_import)
    ds = load_for_checkpoint(ck_a["meta"]["data"], req.data, req.train_subset, req.test_subset, req.subset_seed,
                             req.data_root, mode=req.subset_mode)
    folder = Path(curve_file).parent if req.out is None else Path(req.out)
    names = (run_label(ends[0]["path"]), run_label(ends[1]["path"]))
    base = {"checkpoint_a": ends[0]["path"], "checkpoint_b": ends[1]["path"], "sha256_a": ends[0]["sha256"],
            "sha256_b": ends[1]["sha256"], "model": ck["model"]["name"], "label_a": names[0], "label_b": names[1]}
    state_a, state_b = ck_a["state_dict"], ck_b["state_dict"]
    kind, bends = ck["curve"]["kind"], ck["bends"]
    curve = PathSpec([state_a, *bends, state_b], kind, folder / "curve.h5",
                     f"{kind} curve, {len(bends)} bend(s)",
                     {**base, "path_kind": f"{kind} curve ({len(bends)} bend(s))", "curve_checkpoint": str(curve_file),
                      "sha256_curve": ckpt_io.sha256_file(curve_file)}, recorded_loss(ck_a["meta"]))
    line = line_path(ck_a, ck_b, Path(ends[0]["path"]), Path(ends[1]["path"]), folder / "line.h5", "straight line")
    return [curve, line], model, ds, ck_a["meta"]["data"]
