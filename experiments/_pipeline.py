"""What every pipeline in ``experiments/`` shares: its stages (said as "stage k/N", skipped when their output is
complete, timed), its summary files and copying its figures into ``--figures``. Not a pipeline itself (no
``main``)."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minima.optim.steps import EXIT_INTERRUPTED, TrainingInterrupted


def interruptible(pipeline: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A pipeline's ``main``, made to end well when stopped: Ctrl-C or SIGTERM during any stage — a training stage
    finishes its step and writes ``last.pt``; a grid or sharpness stage has its finished points and results on disk —
    is one line saying so and exit status 75, as for ``minima.train``; running the same command again continues
    (complete stages are kept, the interrupted one resumes). SIGTERM's handler is restored after."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def stoppable(*args: Any, **kwargs: Any) -> int:
            def stop(signum: int, _frame: object) -> None:
                raise KeyboardInterrupt(f"signal {signum}")

            previous = signal.signal(signal.SIGTERM, stop)
            try:
                return main(*args, **kwargs)
            except (TrainingInterrupted, KeyboardInterrupt):
                print(f"[experiments.{pipeline}] interrupted: finished stages, and the interrupted stage's last.pt or "
                      "finished points, are saved — run the same command again to continue", file=sys.stderr,
                      flush=True)
                return EXIT_INTERRUPTED
            finally:
                signal.signal(signal.SIGTERM, previous)

        return stoppable

    return wrap


class StageClock:
    """Runs a pipeline's stages in order: says ``[experiments.<pipeline>] stage k/N: name`` (``(complete, kept)``
    when its output is already complete, and then does not run it) and keeps the seconds each stage took when it
    ran in ``stage_seconds.json`` (``path``; None keeps them in memory only): a stage found complete keeps its
    recorded time and a resumed one adds to it, so a summary's compute time does not collapse on a re-run."""

    def __init__(self, pipeline: str, stages: int, path: Path | None = None) -> None:
        self.pipeline, self.stages, self.path, self.started = pipeline, stages, path, 0
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path is not None and path.exists() else {}

    def run(self, name: str, done: bool, work: Callable[[], Any]) -> Any:
        """``work()``, timed and added to stage ``name``; nothing (None) when ``done``."""
        self.started += 1
        print(f"[experiments.{self.pipeline}] stage {self.started}/{self.stages}: {name}"
              + (" (complete, kept)" if done else ""), flush=True)
        if done:
            return None
        t0 = time.perf_counter()
        try:
            return work()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            if self.path is not None:
                self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")

    @property
    def total(self) -> float:
        """Seconds of every stage, as recorded."""
        return sum(self.seconds.values())


def copy_figures(figures: list[Path], into: Path | None, names: list[str] | None = None) -> list[Path]:
    """``figures`` copied into the directory ``into`` (created), under ``names`` (default: their own); the figures
    themselves when ``into`` is None (``--figures`` not given)."""
    if into is None:
        return list(figures)
    into.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, into / name)) for f, name in zip(figures, names or [f.name for f in figures],
                                                                  strict=True)]


def write_summary(out: Path, markdown: str, record: Any) -> Path:
    """``summary.md`` (the table a person reads) and ``summary.json`` (``record``: the same numbers for code) in the
    run directory ``out``; the markdown file's path."""
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    path = out / "summary.md"
    path.write_text(markdown)
    return path
