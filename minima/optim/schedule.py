"""Learning-rate scaling rule, gradual warmup, and step / cosine / constant schedules.

The learning rate is a pure function of the optimiser step (:func:`learning_rate`), so it needs no state
of its own: resuming at step ``t`` reproduces the exact value, on any number of ranks.

**Scaling** (Goyal et al. 2017, §2): a reference LR ``η_ref`` tuned at a reference batch ``B_ref`` (256)
becomes ``η = η_ref · B / B_ref`` (``linear``), ``η_ref · sqrt(B / B_ref)`` (``sqrt``) or ``η_ref`` (``none``)
at global batch ``B``.

**Gradual warmup** (Goyal §2.2): over the first ``warmup_steps`` iterations the LR rises linearly, every
iteration, from ``η_ref`` to the scaled ``η``: ``lr(t) = η_ref + (η − η_ref) · t / warmup_steps``. Below the
reference batch (η < η_ref) the warmup is flat at η.

**Momentum and a changing LR.** PyTorch's SGD keeps ``v ← μ·v + g`` and steps ``θ ← θ − lr·v``: the LR
multiplies the buffer at every step instead of being folded into it. Goyal et al. write the update as
``v ← μ·v + lr·g; θ ← θ − v`` and need a *momentum correction* (scale ``v`` by ``lr_{t+1}/lr_t``) whenever the
LR changes; PyTorch's form is already equivalent to the corrected update, so no correction is applied.

**Stochastic weight averaging** (Izmailov et al. 2018) replaces the schedule from its first step ``swa_start`` on:
with η₀ the schedule's LR at step ``swa_start − 1`` and e the SWA epochs completed, ``lr = α·swa_lr + (1 − α)·η₀``
with α = (1 − cos(π·min(1, e/A)))/2 over ``A = swa_anneal_epochs`` ≥ 1, and ``swa_lr`` at once for A = 0 — the values
``torch.optim.swa_utils.SWALR`` (cosine annealing, stepped once per epoch) gives, as a function of the step.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

from minima.core.vocab import ScalingRule, ScheduleKind

SCALING_RULES: tuple[str, ...] = typing.get_args(ScalingRule)
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleKind)


def scaled_lr(ref_lr: float, ref_batch: int, global_batch: int, rule: str) -> float:
    """The LR at ``global_batch`` under scaling ``rule`` from ``ref_lr`` at ``ref_batch``."""
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}; choose one of {list(SCALING_RULES)}")
    if ref_batch < 1 or global_batch < 1:
        raise ValueError(f"batch sizes must be ≥ 1; got ref_batch={ref_batch}, global_batch={global_batch}")
    ratio = global_batch / ref_batch
    return ref_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


@dataclass(frozen=True)
class LRSchedule:
    """Everything :func:`learning_rate` needs, in units of optimiser steps.

    ``start_lr``: LR at step 0 of the warmup (Goyal: the reference LR); ``peak_lr``: the scaled LR reached
    at the end of warmup; ``milestones``: steps at which ``step`` multiplies the LR by ``gamma``.
    """

    peak_lr: float
    start_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    final_lr: float = 0.0
    swa_start: int | None = None  # the first step at SWA's learning rate (None: no SWA)
    swa_lr: float = 0.0
    swa_anneal_epochs: int = 0
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.kind!r}; choose one of {list(SCHEDULES)}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"need warmup_steps ≥ 0 and total_steps ≥ 1; got {self.warmup_steps}, "
                             f"{self.total_steps}")


def learning_rate(step: int, s: LRSchedule) -> float:
    """The LR used for optimiser step ``step`` (0-based)."""
    if s.swa_start is not None and step >= s.swa_start:
        if s.swa_anneal_epochs == 0:
            return s.swa_lr
        before = _base_rate(max(s.swa_start - 1, 0), s)
        t = min(1.0, (step - s.swa_start) // s.steps_per_epoch / s.swa_anneal_epochs)
        alpha = (1.0 - math.cos(math.pi * t)) / 2
        return s.swa_lr * alpha + before * (1 - alpha)
    return _base_rate(step, s)


def _base_rate(step: int, s: LRSchedule) -> float:
    if step < s.warmup_steps:
        return s.start_lr + (s.peak_lr - s.start_lr) * step / s.warmup_steps
    if s.kind == "constant":
        return s.peak_lr
    if s.kind == "step":
        return s.peak_lr * s.gamma ** sum(step >= m for m in s.milestones)
    # cosine from the end of warmup to total_steps: peak at the start, final_lr at the end
    span = max(s.total_steps - s.warmup_steps, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    return s.final_lr + (s.peak_lr - s.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(
    *, ref_lr: float, ref_batch: int, global_batch: int, scaling: str, warmup_epochs: float,
    kind: str, milestones_epochs: tuple[float, ...], gamma: float, epochs: int, steps_per_epoch: int,
    swa_start_epoch: int | None = None, swa_lr: float = 0.0, swa_anneal_epochs: int = 0,
) -> LRSchedule:
    """An :class:`LRSchedule` from epoch-based settings (warmup, milestones and the start of SWA given in epochs)."""
    peak = scaled_lr(ref_lr, ref_batch, global_batch, scaling)
    return LRSchedule(
        peak_lr=peak,
        # Goyal's warmup climbs from η_ref to kη for k > 1; below the reference batch there is nothing to
        # climb to, so the LR starts at its (smaller) scaled value instead of decaying from η_ref.
        start_lr=min(ref_lr, peak),
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        total_steps=epochs * steps_per_epoch,
        kind=kind,
        milestones=tuple(round(m * steps_per_epoch) for m in milestones_epochs),
        gamma=gamma,
        swa_start=None if swa_start_epoch is None else swa_start_epoch * steps_per_epoch,
        swa_lr=swa_lr,
        swa_anneal_epochs=swa_anneal_epochs,
        steps_per_epoch=steps_per_epoch,
    )
