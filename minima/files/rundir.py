"""A training run's directory as a format (``minima.run/1``), read and written through this module only.

``RUN/`` holds:

``config.json``
    the resolved training request (every field, defaults included), written when the run starts
``status.json``
    ``{"format", "state", "reason", "epoch", "step", "updated"}``; ``state`` is one of ``running`` (started, or
    killed without a word), ``complete`` (``final.pt`` written; ``reason`` says why it stopped: the epoch cap or the
    stopping rule), ``interrupted`` (a signal: ``last.pt`` written, ``--resume`` continues it), ``diverged`` (the
    training loss became NaN/inf; ``last.pt`` holds the last good epoch) or ``failed`` (any other error; ``reason``
    is its one line)
``metrics.jsonl``
    one JSON object per finished epoch: ``epoch``, ``step``, ``lr``, ``train_loss``, ``train_accuracy``,
    ``train_samples``, ``images_per_s``, ``elapsed_s`` (seconds since the run started, summed over resumes), with
    ``--eval-test`` also ``test_loss``, ``test_accuracy``, ``test_nonfinite``, with probes ``probe_seconds``, and
    ``stopped`` on the epoch the stopping rule ended; lines of epochs after the resumed ``last.pt`` are dropped on
    resume
``init.pt`` ``last.pt`` ``final.pt`` ``epoch_XXXX.pt``
    checkpoints (``minima.checkpoint/2``)
``probes.h5``
    the probe timeline (``minima.files.timeline``), when the run probes

A directory written before ``status.json`` existed reads as ``complete`` when it holds ``final.pt``, ``interrupted``
when it holds only ``last.pt``, and ``new`` when it holds neither (:func:`RunDir.status`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minima import utc_now
from minima.core.vocab import RunState, check_choice
from minima.files import timeline

FORMAT = "minima.run/1"


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: its ``state`` (:data:`minima.core.vocab.RunState`, or ``new`` for a directory with no run
    yet), why (``reason``), the epoch and optimiser step it reached, and when this was written (UTC, ISO 8601)."""

    state: str
    reason: str | None = None
    epoch: int = 0
    step: int = 0
    updated: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run has an outcome that running it again would not change: complete, or diverged."""
        return self.state in ("complete", "diverged")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (flushed, fsynced) and ``os.replace``: a reader never sees
    half a file, and a process killed while writing leaves the previous one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """One training run's directory (see the module docstring for the layout). Reading never writes; the writers
    (the trainer's) create nothing but the file they are named after."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # checkpoints
    @property
    def final(self) -> Path:
        """The path of ``final.pt``, the checkpoint written when training ends."""
        return self.path / "final.pt"

    @property
    def last(self) -> Path:
        """The path of ``last.pt``, the resumable checkpoint written every epoch and on a signal."""
        return self.path / "last.pt"

    @property
    def init(self) -> Path:
        """The path of ``init.pt``, the initial weights."""
        return self.path / "init.pt"

    def epoch_checkpoints(self) -> list[Path]:
        """``epoch_XXXX.pt`` in epoch order."""
        return sorted(p for p in self.path.glob("epoch_*.pt") if re.fullmatch(r"epoch_\d+", p.stem))

    # configuration
    def config(self) -> dict[str, Any]:
        """The resolved training request of ``config.json`` ({} for a directory without one)."""
        path = self.path / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def write_config(self, resolved: dict[str, Any]) -> None:
        """Write the resolved training request to ``config.json`` (atomically)."""
        write_text_atomic(self.path / "config.json", json.dumps(resolved, indent=2) + "\n")

    # per-epoch metrics
    def metrics(self) -> list[dict[str, Any]]:
        """Every finished epoch's metrics, in order ([] before the first epoch ends). A last line cut short (a process
        killed while appending it) is not an epoch and is left out; a bad line before it is an error naming it."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise ValueError(f"{path} line {number} is not JSON; the run directory is damaged") from None
        return rows

    def steps_to_loss(self, threshold: float) -> int | None:
        """Optimiser steps taken by the end of the first epoch whose training loss (the epoch's running mean) is at or
        below ``threshold`` — Jiang et al.'s "steps to reach cross-entropy 0.1 / 0.01" at epoch resolution; None when
        no epoch reached it."""
        for row in self.metrics():
            if row.get("train_loss") is not None and row["train_loss"] <= threshold:
                return int(row["step"])
        return None

    def last_metrics(self) -> dict[str, Any]:
        """The last finished epoch's metrics ({} before the first)."""
        rows = self.metrics()
        return rows[-1] if rows else {}

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one epoch's metrics as a line of ``metrics.jsonl``."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, completed_epochs: int) -> None:
        """Drop the lines of epochs after ``completed_epochs`` (a resume computes them again)."""
        if (self.path / "metrics.jsonl").exists():
            kept = [row for row in self.metrics() if row["epoch"] <= completed_epochs]
            write_text_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    # status
    def status(self) -> RunStatus:
        """``status.json``, or for a directory written before it existed: ``complete`` with ``final.pt``,
        ``interrupted`` with only ``last.pt``, else ``new``."""
        path = self.path / "status.json"
        if path.exists():
            record = json.loads(path.read_text())
            return RunStatus(**{k: record.get(k) for k in ("state", "reason", "epoch", "step", "updated")})
        last = self.last_metrics()
        where = {"epoch": int(last.get("epoch", 0)), "step": int(last.get("step", 0))}
        if self.final.exists():
            return RunStatus("complete", last.get("stopped"), **where)
        if self.last.exists():
            return RunStatus("interrupted", None, **where)
        return RunStatus("new")

    def set_status(self, state: str, reason: str | None = None, epoch: int = 0, step: int = 0) -> RunStatus:
        """Write ``status.json`` with ``state`` (a :data:`~minima.core.vocab.RunState`) and return it."""
        check_choice("run state", state, RunState)
        status = RunStatus(state, reason, epoch, step, utc_now())
        write_text_atomic(self.path / "status.json", json.dumps({"format": FORMAT, **asdict(status)}, indent=2) + "\n")
        return status

    # probes
    def probes(self) -> dict[str, Any]:
        """The probe timeline (:func:`minima.files.timeline.load`), or {} for a run without probes."""
        path = self.path / "probes.h5"
        return timeline.load(path) if path.exists() else {}
