"""``python -m minima.zoo STUDY.toml``: train, evaluate and measure every run of a study; one table of them all.

On a pool of local workers or as a Slurm job array; the table is ``runs.csv`` in the study's directory.
``python -m minima.zoo analyze STUDY_DIR|TABLE.csv`` scores every measure of the table as a predictor of the
generalisation gap (:mod:`minima.pipelines.analysis`).

The command: flags generated from :class:`minima.pipelines.zoo.ZooRequest`, then :func:`minima.pipelines.zoo.zoo`.
SIGTERM or Ctrl-C stops every run at its next step with its ``last.pt`` written (exit 75); the same command
continues, re-running no complete run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.optim.steps import EXIT_INTERRUPTED
from minima.pipelines.analysis import AnalysisRequest, analyze
from minima.pipelines.zoo import ZooInterrupted, ZooRequest, zoo

__all__ = ["AnalysisRequest", "ZooRequest", "analyze", "main", "parse_args", "zoo"]


def parse_args(argv: Sequence[str] | None = None) -> ZooRequest:
    """The :class:`~minima.pipelines.zoo.ZooRequest` of a command line (``sys.argv`` when ``argv`` is None)."""
    p = cfg.ArgumentParser(prog="python -m minima.zoo", description=__doc__.split("\n")[0],
                           epilog="The study file: experiments/studies/zoo-smoke.toml is a 4-run example "
                                  "(docs/guide/zoo.md).")
    cfg.add_arguments(p, ZooRequest)
    return cfg.resolve(ZooRequest, None, p.parse_args(argv))


def parse_analysis(argv: Sequence[str]) -> AnalysisRequest:
    p = cfg.ArgumentParser(prog="python -m minima.zoo analyze", description=AnalysisRequest.__doc__)
    cfg.add_arguments(p, AnalysisRequest)
    return cfg.resolve(AnalysisRequest, None, p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.zoo``: run a study, or ``analyze`` one; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["analyze"]:
        return run_command("minima.zoo", lambda: analyze(parse_analysis(args[1:])))
    return run_command("minima.zoo", lambda: zoo(parse_args(args)), statuses={ZooInterrupted: EXIT_INTERRUPTED})


if __name__ == "__main__":
    sys.exit(main())
