"""``python -m minima.curve A.pt B.pt``: train a low-loss curve between two minima and evaluate it against the line.

The command: flags generated from :class:`minima.studies.curve.CurveRequest`, one process-group session, then
:func:`minima.pipelines.curve.run`: optionally align B to A first (``--align``), train the curve, evaluate the curve,
the straight line between its endpoints and — with ``--align`` — the straight line to the unaligned B, and draw them
in one figure, ``curve_vs_lines.png``. ``--evaluate DIR/curve.pt`` evaluates a trained curve again."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from minima.core import config as cfg
from minima.core import distributed
from minima.core.cli import run_command
from minima.optim.steps import EXIT_INTERRUPTED, TrainingInterrupted
from minima.pipelines.curve import run
from minima.studies.curve import CurveRequest
from minima.studies.loop import NonFiniteLossError

__all__ = ["CurveRequest", "main", "parse_args", "run"]


def parse_args(argv: Sequence[str] | None = None) -> CurveRequest:
    """The :class:`~minima.studies.curve.CurveRequest` of a command line (``sys.argv`` when ``argv`` is None)."""
    p = cfg.ArgumentParser(prog="python -m minima.curve", description=__doc__.split("\n")[0])
    cfg.add_arguments(p, CurveRequest)
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    return cfg.resolve(CurveRequest, None, args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.curve``: align (optionally), train and evaluate a curve; returns the exit status."""
    req = parse_args(argv)
    def work() -> list[Path]:
        with distributed.session(req.device):  # one process group for the alignment, the training and the grids
            return run(req)

    return run_command("minima.curve", work, statuses={TrainingInterrupted: EXIT_INTERRUPTED},
                       user_errors=(NonFiniteLossError,),
                       interrupted="interrupted; rerun the same command with --resume")


if __name__ == "__main__":
    sys.exit(main())
