"""``python -m minima.interpolate ckptA ckptB``: loss and accuracy along θ(α) = (1 − α)·θ_A + α·θ_B.

The command: flags generated from :class:`minima.studies.interpolate.SweepRequest`, then
:func:`minima.studies.interpolate.run` (on the grid runner, :mod:`minima.studies.grid`). Its Python entry points are
importable from here as documented: ``interpolate`` (two models in memory → :class:`minima.files.results.Curve`),
``run``, ``SweepRequest`` and ``parse_alphas``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.studies.interpolate import EndpointMismatchError, SweepRequest, interpolate, parse_alphas, run

__all__ = ["SweepRequest", "interpolate", "main", "parse_alphas", "parse_args", "run"]


def parse_args(argv: Sequence[str] | None = None) -> SweepRequest:
    """The :class:`~minima.studies.interpolate.SweepRequest` of a command line (``sys.argv`` when ``argv`` is None)."""
    p = cfg.ArgumentParser(prog="python -m minima.interpolate", description=__doc__.split("\n")[0])
    cfg.add_arguments(p, SweepRequest)
    # intermixed: "A.pt --alphas=... B.pt" works as well as "A.pt B.pt --alphas=..."
    args = p.parse_intermixed_args(cfg.join_negative_values(list(sys.argv[1:] if argv is None else argv), ["--alphas"]))
    return cfg.resolve(SweepRequest, None, args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.interpolate``: evaluate the line; returns the exit status (1 when the endpoints do not
    reproduce the checkpoints)."""
    req = parse_args(argv)
    return run_command("minima.interpolate", lambda: run(req), statuses={EndpointMismatchError: 1},
                       interrupted="interrupted; finished points are saved — rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
