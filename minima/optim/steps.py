"""What every training loop shares about its steps: the seed of a step and the stop signals it checks.

A step's randomness (dropout masks, augmentation, a curve's t) is drawn from ``torch.manual_seed(step_seed(seed,
step, rank))`` set before the step, so a run resumed at step k draws exactly what the uninterrupted run drew.
SIGTERM/SIGINT become a flag the loop reads after each step: the step finishes, a resumable checkpoint is written,
and the run ends with a message saying how to resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: "try again" — what a requeueing cluster script wants to see


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived: the current step finished and ``last.pt`` was written."""

    def __init__(self, checkpoint: Path, message: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of optimiser step ``step`` (0-based) on ``rank`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + step * 8191 + rank * 131_071 + 12_345) % (2**63 - 1)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop training gracefully: SIGTERM and SIGINT; inside a submitit Slurm job SIGUSR2 and SIGINT
    instead (submitit announces pre-emption and time-outs with USR2 and ignores SIGTERM, which Slurm sends to every
    process right before the kill: the run must have saved by then)."""
    if os.environ.get("SUBMITIT_EXECUTOR", "") == "slurm":
        return (signal.SIGUSR2, signal.SIGINT)
    return (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn the stop signals (:func:`stop_signals`) into a flag (``flag["signal"]``) checked after each step; the
    handlers are restored after. Outside the main thread (where handlers cannot be set) the flag never rises."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: object) -> None:
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in stop_signals()}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
