"""What every pipeline in ``experiments/`` shares: its command line (:class:`Pipeline`: preset, overrides, ``--out``,
``--figures``, ``--dry-run``, ``--shard``) and running its stages, stopping well (:func:`interruptible`), its
summary files and copying its figures into ``--figures``. Not a pipeline itself (no ``main``)."""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima.core import config as cfg
from minima.files.rundir import write_text_atomic
from minima.optim.steps import EXIT_INTERRUPTED, TrainingInterrupted
from minima.pipelines import declared
from minima.pipelines.declared import Declared, Spec
from minima.pipelines.stages import Rates, Runner, Stage, describe, plan, shard
from minima.pipelines.study import parse_shard


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


@dataclass(frozen=True)
class Pipeline:
    """What every pipeline's command line shares: its preset (``<configs>/<name>_<preset>.toml``, a nested request
    over the library's own requests, :mod:`minima.pipelines.declared`), ``KEY=VALUE`` overrides, ``--out``,
    ``--figures``, ``--dry-run`` and ``--shard K/N``, and running its stages (:mod:`minima.pipelines.stages`)."""

    spec: Spec
    configs: Path

    @property
    def command(self) -> str:
        return f"experiments.{self.spec.name}"

    def load(self, name_or_path: str, overrides: Sequence[str] = ()) -> Declared:
        return declared.load(self.spec, self.configs, name_or_path, overrides)

    def parser(self, doc: str) -> argparse.ArgumentParser:
        """The shared arguments; a pipeline adds its own (``--model``, …). ``doc`` is the pipeline's docstring: its
        first line describes the command, the rest — the presets and how long they take on 2 CPU cores, what the
        pipeline trains first when an input run is missing, what it writes — is shown after the flags."""
        names = sorted(p.stem[len(self.spec.name) + 1:] for p in self.configs.glob(f"{self.spec.name}_*.toml"))
        tables = ", ".join(f"{k}.KEY ({s.help})" for k, s in self.spec.sections.items())
        first, _, rest = doc.strip().partition("\n")
        p = cfg.ArgumentParser(prog=f"python -m {self.command}", description=first, epilog=rest.strip("\n") or None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help=f"override a preset value: the pipeline's own KEY, or {tables}; e.g. train.lr=0.05")
        p.add_argument("--preset", default="quick", help=f"{', '.join(names)} (experiments/configs/pipelines/"
                       f"{self.spec.name}_<name>.toml) or a TOML file's path (default: quick)")
        p.add_argument("--out", type=Path, default=None, help="run directory (default: under runs/)")
        p.add_argument("--figures", type=Path, default=None,
                       help="also copy the figures into this directory, e.g. figures (default: the run directory only)")
        p.add_argument("--dry-run", action="store_true",
                       help="print the plan (every stage: complete or to run, with an estimate) and stop: nothing is "
                            "run or written")
        p.add_argument("--shard", default=None, metavar="K/N",
                       help="run only shard K of N (the stages of every N-th group, e.g. seed), for N machines "
                            "sharing the run directory; the run that finds every stage complete writes the summary")
        return p

    def execute(self, stages: Sequence[Stage], out: Path, args: argparse.Namespace,
                rates: Callable[[], Rates | None], record: dict[str, Any] | None = None) -> Runner | None:
        """``--dry-run``: print the plan with its estimate (``rates()`` times the network) and return None, writing
        nothing. Otherwise write ``preset.json`` (``record``), run this shard's stages and return the runner (its
        ``complete``: every stage is; when not, it was said why — the summary waits for the other shards)."""
        k, n = parse_shard(args.shard) if args.shard else (1, 1)
        done = plan(stages)
        seconds = json.loads((out / "stage_seconds.json").read_text()) if (out / "stage_seconds.json").exists() \
            else {}
        pending = [s for s in (shard(stages, k, n) if n > 1 else stages) if not done[s.name]]
        if pending or args.dry_run:
            with torch.random.fork_rng():  # timing the network draws weights and inputs: the runs' seeds untouched
                text = describe(self.command, stages, done, rates() if pending else None, n, seconds)
            # the dry run's whole plan; a run's whole-job estimate, before its first stage
            print(text if args.dry_run else text.splitlines()[-1], flush=True)
        if args.dry_run:
            return None
        out.mkdir(parents=True, exist_ok=True)
        if record is not None:
            write_text_atomic(out / "preset.json", json.dumps(record, indent=2) + "\n")
        runner = Runner(self.command, out / "stage_seconds.json")
        selected = shard(stages, k, n) if n > 1 else list(stages)
        if not runner.run(stages, selected):
            left = [s.name for s in stages if not s.done()]
            print(f"[{self.command}] shard {k}/{n} done; {len(left)} stage(s) of other shards are not complete "
                  f"({', '.join(left[:4])}{', …' if len(left) > 4 else ''}): the summary is written by the run that "
                  "finds every stage complete — run the command without --shard once every shard has finished",
                  flush=True)
        return runner


def accuracy_difference(a: Sequence[float], b: Sequence[float], test_images: int) -> tuple[float, float, str]:
    """mean(a) − mean(b) of test accuracies in percent, its standard error — across seeds when there are several (the
    seeds' spread), else binomial over the test images (√(p(1 − p)/n) for each) — and how that error was taken."""
    a_mean, b_mean = float(np.mean(a)), float(np.mean(b))
    if len(a) > 1:
        se = float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
        how = f"standard error over {len(a)} seeds"
    else:
        p, q = a_mean / 100, b_mean / 100
        se = 100 * float(np.sqrt(p * (1 - p) / test_images + q * (1 - q) / test_images))
        how = f"binomial standard error over {test_images} test images, one seed"
    return a_mean - b_mean, se, how


def within_noise(diff: float, se: float) -> bool:
    """A difference within 2 standard errors: "not distinguishable" in every pipeline's verdict."""
    return abs(diff) <= 2 * se


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
