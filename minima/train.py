"""The training loop and ``python -m minima.train`` (single process or ``torchrun`` DDP).

Semantics (each stated so a reader can check them against the papers):

* **Global batch** ``B`` is the configured quantity. Each rank takes ``B / world_size`` samples per step;
  if that exceeds ``micro_batch`` the rank accumulates gradients over ``B / (world_size · micro_batch)``
  micro-batches (DDP's ``no_sync`` on all but the last). The loss of a micro-batch is its *sum* of
  per-sample cross-entropies times ``world_size / B``: DDP averages gradients over ranks, so one optimiser
  step equals the single-process step on the full batch of ``B`` samples.
* **BatchNorm** statistics are computed per micro-batch (Goyal's per-worker BN); ``sync_bn`` converts to
  ``SyncBatchNorm`` under DDP (still per micro-batch when accumulating).
* **Epochs**: one permutation per epoch, identical on every rank (seeded by ``(seed, epoch)``), cut into
  global batches; each rank takes its contiguous slice of every global batch. The incomplete final batch
  is dropped, so every step has exactly ``B`` samples.
* **Randomness** (dropout, augmentation) is re-seeded at every step from ``(seed, step, rank)``: resuming
  at any step reproduces the uninterrupted run bit for bit on the same machine, with no RNG state to save.
* **Train metrics** in ``metrics.jsonl`` are exact running sums over the epoch's training samples (train
  mode: dropout on, BN batch statistics), reduced across ranks and divided by the sample count.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minima import checkpoint as ckpt_io
from minima import config as cfg
from minima import data as data_mod
from minima import distributed
from minima.allocator import keep_freed_memory
from minima.evaluate import batch_sums, check_model_accepts, evaluate, sums_to_result
from minima.models import CONVOLUTIONAL, build_model, load_imagenet_weights
from minima.schedule import SCALING_RULES, SCHEDULES, build_schedule, learning_rate

OPTIMIZERS = ("adam", "sgd")
# Settings that may change when a run is resumed (they do not change the computation's result).
RESUMABLE_CHANGES = frozenset({"device", "threads", "progress", "eval_batch_size", "out"})
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again" — what a requeueing cluster script wants to see


def _help(text: str) -> Any:
    return field(default=None, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, with units. Stored in each checkpoint and in ``config.json``."""

    model: str = field(default="c1", metadata={"help": "c1, c2, vgg11_bn or mlp"})
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "extra model arguments"})
    data: str | None = field(default=None, metadata={
        "help": "an .npz file, a torchvision CIFAR-10 root, or 'synthetic' (default: $MINIMA_DATA, then download)"})
    train_subset: int | None = field(default=None, metadata={"help": "stratified training subset size"})
    test_subset: int | None = field(default=None, metadata={"help": "stratified test subset size"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the stratified subsets"})
    epochs: int = field(default=20, metadata={"help": "maximum number of epochs"})
    batch_size: int = field(default=256, metadata={"help": "global batch size (samples per optimiser step)"})
    micro_batch: int | None = field(default=None, metadata={
        "help": "largest per-rank forward batch; gradients are accumulated above it"})
    optimizer: str = field(default="adam", metadata={"help": "adam or sgd"})
    lr: float = field(default=1e-3, metadata={"help": "reference learning rate at --ref-batch"})
    ref_batch: int = field(default=256, metadata={"help": "batch size at which --lr was tuned"})
    scaling: str = field(default="none", metadata={"help": "LR scaling rule: linear, sqrt or none"})
    warmup_epochs: float = field(default=0.0, metadata={"help": "gradual warmup length in epochs"})
    schedule: str = field(default="constant", metadata={"help": "constant, step or cosine"})
    milestones: tuple[float, ...] = field(default=(), metadata={"help": "epochs at which step decays"})
    gamma: float = field(default=0.1, metadata={"help": "step-decay factor"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum (SGD)"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 weight decay coefficient"})
    decay_bn_bias: bool = field(default=False, metadata={
        "help": "also apply weight decay to BatchNorm and bias parameters (Goyal: no)"})
    adam_betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    augment: bool = field(default=False, metadata={"help": "random crop (pad 4) + horizontal flip"})
    seed: int = field(default=0, metadata={"help": "seed of shuffling, dropout and augmentation"})
    init_seed: int | None = field(default=None, metadata={
        "help": "seed of the initial weights (default: --seed); equal values give SB and LB the same x0"})
    init_from: str | None = field(default=None, metadata={"help": "start from this checkpoint's weights"})
    pretrained: str | None = field(default=None, metadata={
        "help": "mobilenet_v2 only: 'imagenet' (torchvision download) or a local ImageNet state-dict file"})
    target_loss: float | None = field(default=None, metadata={
        "help": "stop once the epoch's training loss is at or below this value"})
    patience: int | None = field(default=None, metadata={
        "help": "stop after this many epochs without a training-loss improvement of at least --min-delta"})
    min_delta: float = field(default=1e-4, metadata={"help": "smallest training-loss decrease that counts"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    channels_last: bool | None = field(default=None, metadata={
        "help": "channels_last memory format (default: on for convolutional models)"})
    amp: str = field(default="none", metadata={"help": "none or bf16 (CUDA autocast)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm under DDP"})
    out: str = field(default="runs/run", metadata={"help": "run directory"})
    save_every: int = field(default=0, metadata={"help": "also keep epoch_XXXX.pt every K epochs (0: never)"})
    eval_batch_size: int = field(default=1000, metadata={"help": "batch size of test evaluation"})
    eval_test: bool = field(default=True, metadata={"help": "evaluate the test set after every epoch"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0"})


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: the current step finished and ``last.pt`` was written."""

    def __init__(self, checkpoint: Path, message: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; ``last.pt`` still holds the last good epoch."""


@dataclass
class TrainState:
    """What callbacks see: position in the run and the running sums of the current epoch."""

    epoch: int
    batch: int
    step: int
    lr: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Batch arithmetic derived from the config and the world size."""

    per_rank: int
    micro: int
    accumulation: int
    steps_per_epoch: int


def plan_batches(global_batch: int, world_size: int, micro_batch: int | None, n_train: int) -> Plan:
    """Per-rank batch, micro-batch and accumulation steps; invalid combinations are refused with the
    arithmetic spelled out."""
    if global_batch < 1:
        raise ValueError(f"batch_size must be ≥ 1; got {global_batch}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size} "
                         f"({global_batch} / {world_size} = {global_batch / world_size:g}); choose a multiple "
                         f"of {world_size}")
    per_rank = global_batch // world_size
    micro = per_rank if micro_batch is None else micro_batch
    if micro < 1:
        raise ValueError(f"micro_batch must be ≥ 1; got {micro}")
    if micro > per_rank:
        raise ValueError(f"micro-batch {micro} is larger than the per-rank batch {per_rank} "
                         f"(= {global_batch} / {world_size} ranks); use --micro-batch ≤ {per_rank}")
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (= {global_batch} / {world_size}) is not divisible by "
                         f"micro-batch {micro} ({per_rank} / {micro} = {per_rank / micro:g}); choose a divisor")
    steps = n_train // global_batch
    if steps == 0:
        raise ValueError(f"the training set has {n_train} samples, fewer than one global batch of "
                         f"{global_batch}; use a smaller --batch-size or more data")
    return Plan(per_rank=per_rank, micro=micro, accumulation=per_rank // micro, steps_per_epoch=steps)


def validate_config(c: TrainConfig) -> None:
    """Refuse settings that name unknown choices or make no sense, before any work starts."""
    choices = {"optimizer": OPTIMIZERS, "scaling": SCALING_RULES, "schedule": SCHEDULES,
               "amp": ("none", "bf16")}
    for key, valid in choices.items():
        if getattr(c, key) not in valid:
            raise ValueError(f"{key}={getattr(c, key)!r} is not valid; choose one of {list(valid)}")
    if c.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1; got {c.epochs}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0; got {c.lr}")
    if c.warmup_epochs < 0 or c.warmup_epochs > c.epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={c.epochs}]; got {c.warmup_epochs}")
    if c.schedule == "step" and not c.milestones:
        raise ValueError("schedule 'step' needs --milestones (epochs at which the LR is multiplied by --gamma)")


def load_dataset(c: TrainConfig) -> data_mod.Dataset:
    """The dataset named by the config, with its stratified subsets taken."""
    ds = data_mod.load_source(c.data, c.train_subset, c.test_subset)
    return ds.subset(c.train_subset, c.test_subset, c.subset_seed)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 8191 + rank * 131_071 + 12_345) % (2**63 - 1)


def _param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool) -> list[dict[str, Any]]:
    # One-dimensional parameters are biases and BatchNorm scales/shifts (Goyal: no weight decay on them).
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if decay_bn_bias or p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, c.weight_decay, c.decay_bn_bias)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps)
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn SIGTERM/SIGINT into a flag checked after each step (the handlers are restored after)."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: object) -> None:
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]


def _initial_model(c: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = dict(c.model_kwargs)
    torch.manual_seed(c.seed if c.init_seed is None else c.init_seed)
    model = build_model(c.model, num_classes=num_classes, **kwargs)
    stored_kwargs = dict(kwargs, num_classes=num_classes)
    if c.pretrained:
        if c.model != "mobilenet_v2":
            raise ValueError(f"--pretrained is available for mobilenet_v2 only, not {c.model!r}")
        load_imagenet_weights(model, c.pretrained)
    if c.init_from:
        init = ckpt_io.load_checkpoint(c.init_from)
        mine = {"model": {"name": c.model, "kwargs": stored_kwargs}, "state_dict": model.state_dict()}
        ckpt_io.check_compatible(init, mine, c.init_from, "this run's model")
        model.load_state_dict(init["state_dict"])
    return model, stored_kwargs


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset: data_mod.Dataset | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> Path:
    """Train per ``config``; return the path of ``final.pt`` in the run directory ``config.out``.

    ``dataset`` overrides ``config.data`` (the Python API for notebooks and tests). ``resume`` continues
    from ``last.pt`` if present. Raises :class:`TrainingInterrupted` after SIGTERM/SIGINT (``last.pt``
    written) and :class:`NonFiniteLossError` when the loss is NaN/inf (``last.pt`` kept from before).
    """
    validate_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    env = distributed.setup(config.device)
    try:
        return _train(config, env, resume, dataset, on_step, on_epoch)
    finally:
        distributed.teardown()


def _train(
    c: TrainConfig, env: distributed.DistEnv, resume: bool, dataset: data_mod.Dataset | None,
    on_step: Callable[[TrainState], None] | None, on_epoch: Callable[[TrainState], None] | None,
) -> Path:
    run_dir = Path(c.out)
    last_path, final_path, metrics_path = run_dir / "last.pt", run_dir / "final.pt", run_dir / "metrics.jsonl"
    resolved = cfg.to_dict(c)
    state: dict[str, Any] | None = None
    if resume and last_path.exists():
        state = ckpt_io.load_checkpoint(last_path)
        diffs = _config_differences(state["meta"]["train_config"], resolved)
        if diffs:
            raise ValueError(f"cannot resume {last_path} with different settings:\n  " + "\n  ".join(diffs)
                             + "\nstart a new run (another --out) to change them")
    elif not resume and (last_path.exists() or final_path.exists()):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or choose "
                              "another --out")
    if c.amp == "bf16" and env.device.type != "cuda":
        raise ValueError("--amp bf16 is supported on CUDA only; use --amp none on CPU")

    ds = dataset if dataset is not None else load_dataset(c)
    plan = plan_batches(c.batch_size, env.world_size, c.micro_batch, len(ds.train))
    model, model_kwargs = _initial_model(c, ds.num_classes)
    check_model_accepts(model, ds)
    channels_last = c.model in CONVOLUTIONAL if c.channels_last is None else c.channels_last
    schedule = build_schedule(
        ref_lr=c.lr, ref_batch=c.ref_batch, global_batch=c.batch_size, scaling=c.scaling,
        warmup_epochs=c.warmup_epochs, kind=c.schedule, milestones_epochs=tuple(c.milestones),
        gamma=c.gamma, epochs=c.epochs, steps_per_epoch=plan.steps_per_epoch,
    )

    model = model.to(env.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, c)
    epoch, batch0, step, elapsed = 0, 0, 0, 0.0
    carried = torch.zeros(4, dtype=torch.float64)  # running sums of an interrupted epoch (rank 0 only)
    trainer: dict[str, Any] = {"best_loss": float("inf"), "bad_epochs": 0, "stopped": None}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        pos = state["position"]
        epoch, batch0, step, elapsed = pos["epoch"], pos["batch"], state["meta"]["step"], pos["elapsed_s"]
        trainer = dict(state["trainer"])
        if env.is_main:
            carried = state["epoch_sums"].to(torch.float64)
    net: nn.Module = model
    if env.distributed:
        if c.sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    def make_ckpt(kind: str, epoch_sums: torch.Tensor | None = None, position: dict | None = None) -> dict:
        meta = ckpt_io.make_meta(
            epoch=position["epoch"] if position else epoch, step=step, global_batch_size=c.batch_size,
            world_size=env.world_size, seed=c.seed, train_config=resolved,
            data=ds.describe(), metrics=last_metrics,
        )
        extra: dict[str, Any] = {}
        if kind == "resume":
            extra = {"optimizer": optimizer.state_dict(), "scheduler": {"step": step, **asdict(schedule)},
                     "rng": {"scheme": "torch.manual_seed(f(seed, step, rank)) before every step"},
                     "position": position, "epoch_sums": epoch_sums, "trainer": dict(trainer)}
        return ckpt_io.make_checkpoint(c.model, model_kwargs, model.state_dict(), meta, **extra)

    last_metrics: dict[str, Any] = {}
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        print(f"[minima.train] {c.model} on {env.device} × {env.world_size}: global batch {c.batch_size} "
              f"= {env.world_size} ranks × {plan.accumulation} micro-batches × {plan.micro}; "
              f"{plan.steps_per_epoch} steps/epoch ({len(ds.train) - plan.steps_per_epoch * c.batch_size} "
              f"samples of each epoch's shuffle dropped); peak LR {schedule.peak_lr:g}", flush=True)
        print("[minima.train] config: " + json.dumps(resolved, sort_keys=True), flush=True)
        if state is None:
            ckpt_io.save_checkpoint(make_ckpt("final"), run_dir / "init.pt")
        else:
            _truncate_metrics(metrics_path, epoch)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if c.amp == "bf16" else contextlib.nullcontext())
    images_all, labels_all = ds.train.images, ds.train.labels
    if trainer.get("stopped"):
        epoch = c.epochs  # the stopping rule already ended this run before it was interrupted

    with _stop_on_signals() as stop:
        while epoch < c.epochs:
            batches = data_mod.global_batches(data_mod.epoch_permutation(len(ds.train), c.seed, epoch),
                                              c.batch_size)
            sums = torch.zeros(4, dtype=torch.float64, device=env.device)
            net.train()
            t0, seen = time.perf_counter(), 0
            bar = tqdm(total=len(batches), initial=batch0, desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=None if (env.is_main and c.progress) else True, leave=False,
                       dynamic_ncols=True)  # None: off when stderr is not a terminal
            for b in range(batch0, len(batches)):
                lr = learning_rate(step, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mine = batches[b][env.rank * plan.per_rank : (env.rank + 1) * plan.per_rank]
                seed = _step_seed(c.seed, step, env.rank)
                torch.manual_seed(seed)  # dropout of this step (CPU and CUDA generators)
                aug_gen = torch.Generator().manual_seed(seed)
                optimizer.zero_grad(set_to_none=True)
                for m, chunk in enumerate(mine.split(plan.micro)):
                    x = images_all[chunk]
                    if c.augment:
                        x = data_mod.augment(x, aug_gen)
                    x = data_mod.normalize(x.to(env.device, non_blocking=True), ds.mean, ds.std,
                                           torch.float32, channels_last)
                    y = labels_all[chunk].to(env.device, non_blocking=True)
                    sync = (contextlib.nullcontext() if not env.distributed or m == plan.accumulation - 1
                            else net.no_sync())
                    with sync:
                        with autocast:
                            logits = net(x)
                        loss = F.cross_entropy(logits.float(), y, reduction="sum") * (env.world_size / c.batch_size)
                        loss.backward()
                    sums += batch_sums(logits.detach().float(), y)
                optimizer.step()
                step += 1
                seen += len(mine)
                bar.update(1)
                if step % 10 == 0 or b == len(batches) - 1:
                    bad = not bool(torch.isfinite(sums[0]).item()) or sums[3].item() > 0
                    if distributed.any_rank(bad, env.device):
                        bar.close()
                        raise NonFiniteLossError(
                            f"training loss became NaN/inf in epoch {epoch + 1} by step {step} (LR {lr:g}); "
                            f"{last_path} still holds the last good epoch. Lower --lr, add --warmup-epochs, "
                            "or check the data.")
                if on_step is not None:
                    on_step(TrainState(epoch=epoch, batch=b + 1, step=step, lr=lr))
                if distributed.any_rank(stop["signal"] is not None, env.device) and b + 1 < len(batches):
                    bar.close()
                    total = distributed.all_reduce_sum(sums).cpu() + carried
                    elapsed += time.perf_counter() - t0
                    if env.is_main:
                        pos = {"epoch": epoch, "batch": b + 1, "elapsed_s": elapsed}
                        ckpt_io.save_checkpoint(make_ckpt("resume", total, pos), last_path)
                    distributed.barrier()
                    raise TrainingInterrupted(last_path, (
                        f"stopped by signal {stop['signal']} after step {step} (epoch {epoch + 1}, batch "
                        f"{b + 1}/{len(batches)}); {last_path} written. Resume with: python -m minima.train "
                        f"--out {run_dir} --resume"))
            bar.close()
            train_time = time.perf_counter() - t0
            total = sums_to_result(distributed.all_reduce_sum(sums).cpu() + carried)
            carried = torch.zeros(4, dtype=torch.float64)
            batch0 = 0
            epoch += 1
            metrics: dict[str, Any] = {
                "epoch": epoch, "step": step, "lr": lr, "train_loss": total.loss,
                "train_accuracy": total.accuracy, "train_samples": total.count,
                "images_per_s": seen * env.world_size / train_time if train_time > 0 else float("nan"),
            }
            if c.eval_test:
                test = evaluate(model, ds.test, ds.mean, ds.std, batch_size=c.eval_batch_size,
                                device=env.device, channels_last=channels_last, rank=env.rank,
                                world_size=env.world_size)
                metrics.update(test_loss=test.loss, test_accuracy=test.accuracy, test_nonfinite=test.nonfinite)
            elapsed += time.perf_counter() - t0
            metrics["elapsed_s"] = elapsed
            last_metrics = metrics
            stopped = _stopping_rule(c, trainer, total.loss)
            if stopped:
                trainer["stopped"] = stopped
                metrics["stopped"] = stopped
            if env.is_main:
                pos = {"epoch": epoch, "batch": 0, "elapsed_s": elapsed}
                ckpt_io.save_checkpoint(make_ckpt("resume", torch.zeros(4, dtype=torch.float64), pos), last_path)
                if c.save_every and epoch % c.save_every == 0:
                    ckpt_io.save_checkpoint(make_ckpt("final"), run_dir / f"epoch_{epoch:04d}.pt")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                msg = (f"epoch {epoch}/{c.epochs} step {step} lr {lr:.4g} train loss {total.loss:.4f} "
                       f"acc {total.accuracy:.4f}")
                if c.eval_test:
                    msg += f" | test loss {metrics['test_loss']:.4f} acc {metrics['test_accuracy']:.4f}"
                tqdm.write(msg + f" | {metrics['images_per_s']:.0f} img/s")
                if stopped:
                    tqdm.write(f"[minima.train] stopping: {stopped}")
            if on_epoch is not None:
                on_epoch(TrainState(epoch=epoch, batch=0, step=step, lr=lr, metrics=metrics))
            if stopped:
                break
            if distributed.any_rank(stop["signal"] is not None, env.device) and epoch < c.epochs:
                raise TrainingInterrupted(last_path, (
                    f"stopped by signal {stop['signal']} at the end of epoch {epoch}; {last_path} written. "
                    f"Resume with: python -m minima.train --out {run_dir} --resume"))
    if env.is_main:
        ckpt_io.save_checkpoint(make_ckpt("final"), final_path)
        print(f"[minima.train] wrote {final_path}", flush=True)
    distributed.barrier()
    return final_path


def _stopping_rule(c: TrainConfig, trainer: dict[str, Any], loss: float) -> str | None:
    """Keskar trained "until the loss function ceased to improve": a loss target and/or a plateau patience.
    Updates ``trainer`` (best loss, epochs without improvement); returns the reason to stop, if any."""
    if c.target_loss is not None and loss <= c.target_loss:
        return f"training loss {loss:.4g} ≤ target {c.target_loss:g}"
    if loss < trainer["best_loss"] - c.min_delta:
        trainer["best_loss"], trainer["bad_epochs"] = loss, 0
    else:
        trainer["bad_epochs"] += 1
    if c.patience is not None and trainer["bad_epochs"] >= c.patience:
        return f"training loss has not improved by {c.min_delta:g} for {c.patience} epochs"
    return None


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop lines of epochs after the checkpoint being resumed (they will be recomputed)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= completed_epochs]
    path.write_text("".join(ln + "\n" for ln in kept))


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Config (defaults ← ``--config`` TOML ← flags, or ← the run's own ``config.json`` on ``--resume``)."""
    parser = argparse.ArgumentParser(prog="python -m minima.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="TOML preset (experiments/configs/*.toml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    cfg.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    config = cfg.resolve(TrainConfig, args.config, args)
    stored = Path(config.out) / "config.json"
    if args.resume and args.config is None and stored.exists():
        # Resuming needs no flags but --out: start from the run's own settings, then apply what was given.
        given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
        config = cfg.resolve(TrainConfig, None, {**json.loads(stored.read_text()), **given})
    return config, args.resume


def main(argv: Sequence[str] | None = None) -> int:
    config, resume = parse_args(argv)
    keep_freed_memory()
    try:
        train(config, resume=resume)
    except TrainingInterrupted as exc:
        print(f"[minima.train] {exc}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (NonFiniteLossError, ValueError, OSError) as exc:  # OSError: missing files, failed downloads
        print(f"[minima.train] error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
