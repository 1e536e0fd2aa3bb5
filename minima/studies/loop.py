"""The one training loop: the optimiser steps of an epoch, for any task (a network, a curve between two networks).

What the loop owns, identical for every task:

* the **learning rate** of step ``k``, set on every parameter group before the step (the task's schedule);
* the **seed** of step ``k``: ``torch.manual_seed(step_seed(seed, k, rank))`` before the step (dropout, and whatever
  the task draws — augmentation offsets, a curve's t), so a run resumed at any step draws what the uninterrupted
  run drew;
* the **checks**, every :data:`CHECK_EVERY` steps and after the epoch's last: whether the epoch's loss became
  non-finite on some rank (:class:`NonFiniteLossError`; ``last.pt`` keeps the last good epoch) and whether a stop
  signal arrived on some rank — both flags in one device tensor, one all-reduce under DDP and one host read;
* the **stop**: in one process right after the step during which the signal arrived, under DDP at the check where
  every rank agreed (no rank waits in a collective the others have left); the task writes its resumable checkpoint
  at that position and :class:`~minima.optim.steps.TrainingInterrupted` says how to resume;
* the **callbacks**: the task's own after each step (probes), then the user's ``on_step`` with a :class:`TrainState`;
* the progress bar (rank 0).

What a task provides (:class:`Task`): its position, this epoch's number of global batches, the step itself
(forward, backward, optimiser step, its batch sums accumulated in place, in order), the resumable checkpoint of an
interrupted epoch, and the :class:`TrainState` its callbacks see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from minima.core import distributed
from minima.data import DeviceBatches, Placement, Split, epoch_permutation, global_batches
from minima.optim.schedule import LRSchedule, learning_rate
from minima.optim.steps import TrainingInterrupted, step_seed

#: Steps between the loop's host reads (non-finite loss, and under DDP the stop signal).
CHECK_EVERY = 10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; ``last.pt`` still holds the last good epoch."""


@dataclass
class TrainState:
    """What ``on_step``/``on_epoch`` callbacks see: the position in the run (``step``: optimiser steps taken), the
    learning rate of the last step, the epoch's metrics (``on_epoch``), and — for users' own probes — the live
    ``model`` (unwrapped from DDP; read it, do not change it; ``None`` for a curve, whose trained parameters are the
    ``optimizer``'s), the ``optimizer`` and the process's ``env`` (rank, world size, device). Under torchrun every
    rank calls the callback at the same step."""

    epoch: int
    batch: int
    step: int
    lr: float
    metrics: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    env: distributed.DistEnv | None = None


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


def epoch_batches(split: Split, placement: Placement, seed: int, epoch: int, global_batch: int, plan: Plan,
                  first: int, env: distributed.DistEnv) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """An epoch's global batches (one permutation seeded by ``(seed, epoch)``, the same on every rank, the short last
    batch dropped) and this rank's micro-batches of batches ``first`` … in order — each rank takes its contiguous
    slice of every global batch, cut into ``plan.micro`` —, fetched one ahead when the data is in pinned host memory.
    Returns the number of global batches and the micro-batches' iterator."""
    perm = epoch_permutation(len(split), seed, epoch)
    if split.images.device != perm.device:  # data resident on the GPU: index it there, one copy per epoch
        perm = perm.to(split.images.device)
    batches = global_batches(perm, global_batch)
    chunks = [chunk for b in range(first, len(batches))
              for chunk in batches[b][env.rank * plan.per_rank : (env.rank + 1) * plan.per_rank].split(plan.micro)]
    return len(batches), iter(DeviceBatches(split, chunks, env.device, placement.pinned))


class Task(Protocol):
    """What the loop trains. ``epoch``/``step`` are its position (``step`` is advanced by the loop after every
    optimiser step)."""

    env: distributed.DistEnv
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    seed: int
    epoch: int
    epochs: int
    step: int

    def train_step(self, batch: int, seed: int, sums: torch.Tensor) -> None:
        """Global batch ``batch`` of this epoch: forward, backward, optimiser step; its ``[loss, correct, count,
        nonfinite]`` sums added to ``sums`` (float64, on the device)."""

    def after_step(self, batch: int, batches: int, lr: float) -> None:
        """The task's own callbacks after a step (e.g. probes)."""

    def save_interrupted(self, sums: torch.Tensor, batch: int) -> None:
        """Every rank: the resumable checkpoint at ``batch`` of this epoch with the epoch's ``sums`` so far (rank 0
        writes; the sums are reduced over ranks)."""

    def resume_hint(self) -> str:
        """How to continue an interrupted run (a command line)."""

    def state(self, batch: int, lr: float) -> TrainState:
        """What the user's ``on_step`` callback sees after step ``self.step`` (``batch`` global batches done)."""


def check(env: distributed.DistEnv, sums: torch.Tensor, stop: dict[str, int | None], epoch: int, step: int,
          lr: float, last: str, bar: Any) -> bool:
    """The loop's only synchronisation: raise :class:`NonFiniteLossError` if the epoch's loss became non-finite on
    some rank; return whether a stop signal arrived on some rank."""
    bad = (~torch.isfinite(sums[0])) | (sums[3] > 0)
    flags = torch.stack([bad.to(torch.float64), torch.tensor(float(stop["signal"] is not None),
                                                             dtype=torch.float64, device=sums.device)])
    if env.distributed:
        flags = distributed.all_reduce_sum(flags)
    any_bad, any_stop = flags.tolist()
    if any_bad > 0:
        bar.close()
        raise NonFiniteLossError(
            f"training loss became NaN/inf in epoch {epoch + 1} by step {step} (LR {lr:g}); {last} still holds the "
            "last good epoch. Lower --lr, add --warmup-epochs, or check the data.")
    return any_stop > 0


def stop_now(env: distributed.DistEnv, stop: dict[str, int | None], agreed: bool) -> bool:
    """Whether training stops after this step: in one process as soon as a signal has arrived (a Python flag, free
    to read at every step, also one that arrived during ``on_step``); under DDP only where every rank agreed at a
    check (``agreed``), so no rank waits in a collective the others have left."""
    return stop["signal"] is not None if not env.distributed else agreed


def run_epoch(task: Task, first: int, batches: int, stop: dict[str, int | None], last: str,
              on_step: Callable[[TrainState], None] | None, desc: str, progress: bool) -> tuple[torch.Tensor, float]:
    """The steps of global batches ``first`` … ``batches − 1`` of the task's current epoch. Returns this rank's
    running sums ``[loss, correct, count, nonfinite]`` (float64 on the device) and the last learning rate."""
    env = task.env
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)
    lr = learning_rate(task.step, task.schedule)
    bar = tqdm(total=batches, initial=first, desc=desc, disable=None if (env.is_main and progress) else True,
               leave=False, dynamic_ncols=True)  # None: off when stderr is not a terminal
    for b in range(first, batches):
        lr = learning_rate(task.step, task.schedule)
        for group in task.optimizer.param_groups:
            group["lr"] = lr
        seed = step_seed(task.seed, task.step, env.rank)
        torch.manual_seed(seed)  # dropout of this step (CPU and CUDA generators)
        task.train_step(b, seed, sums)
        task.step += 1
        task.after_step(b, batches, lr)
        bar.update(1)
        agreed = (check(env, sums, stop, task.epoch, task.step, lr, last, bar)
                  if task.step % CHECK_EVERY == 0 or b == batches - 1 else False)
        if on_step is not None:
            on_step(task.state(b + 1, lr))
        if stop_now(env, stop, agreed) and b + 1 < batches:
            bar.close()
            task.save_interrupted(sums, b + 1)
            distributed.barrier()
            raise TrainingInterrupted(last, (
                f"stopped by signal {stop['signal']} after step {task.step} (epoch {task.epoch + 1}, batch "
                f"{b + 1}/{batches}); {last} written. Resume with: {task.resume_hint()}"))
    bar.close()
    return sums, lr
