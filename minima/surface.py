"""``python -m minima.surface A.pt`` | ``A.pt B.pt C.pt`` | ``--trajectory run/epoch_*.pt``: loss surfaces.

The command: flags generated from :class:`minima.studies.surface.SurfaceRequest`, then
:func:`minima.studies.surface.run` (on the grid runner, :mod:`minima.studies.grid`); ``surface`` (a plane in memory →
:class:`minima.files.results.Grid`), ``run`` and ``SurfaceRequest`` are importable from here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.studies.surface import SurfaceRequest, run, surface

__all__ = ["SurfaceRequest", "main", "parse_args", "run", "surface"]


def parse_args(argv: Sequence[str] | None = None) -> SurfaceRequest:
    """The :class:`~minima.studies.surface.SurfaceRequest` of a command line (``sys.argv`` when ``argv`` is None)."""
    p = cfg.ArgumentParser(prog="python -m minima.surface", description=__doc__.split("\n")[0])
    cfg.add_arguments(p, SurfaceRequest)
    args = p.parse_intermixed_args(cfg.join_negative_values(list(sys.argv[1:] if argv is None else argv),
                                                            ["--x", "--y"]))
    return cfg.resolve(SurfaceRequest, None, args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.surface``: compute the plane; returns the exit status."""
    req = parse_args(argv)
    return run_command("minima.surface", lambda: run(req),
                       interrupted="interrupted; finished points are saved — rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
