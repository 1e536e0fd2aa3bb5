"""``python -m minima.sharpness A.pt [B.pt …]``: sharpness and curvature of checkpoints into an HDF5 file.

The command: flags generated from the measurement request (:func:`minima.studies.sharpness.measure_request_type`:
the common settings plus every parameter of the metrics registered in :mod:`minima.curvature.registry` when the
arguments are parsed, entry-point plugins included), then :func:`minima.studies.sharpness.measure`. The metric
functions are importable from here as documented (they live in :mod:`minima.curvature.measures`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.curvature.measures import (
    DenseSubspace,
    RandomSubspace,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
)
from minima.curvature.objective import NondeterministicLossError
from minima.curvature.registry import REGISTRY
from minima.studies.sharpness import DEPRECATED_FLAGS, MeasureOptions, measure, measure_request_type, show

__all__ = ["DenseSubspace", "RandomSubspace", "adaptive_sharpness", "average_sharpness", "keskar_sharpness", "main",
           "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> MeasureOptions:
    """The measurement request of a command line, with the flags of every metric registered now."""
    cls = measure_request_type()
    metrics = "; ".join(f"{m.name} — {m.summary}" for m in REGISTRY.values())
    p = cfg.ArgumentParser(prog="python -m minima.sharpness", description=__doc__.split("\n")[0],
                                epilog=f"metrics: {metrics}. python -m minima.sharpness --show FILE.h5 prints a "
                                "results file's table with the settings of every result.")
    p.add_argument("--show", metavar="FILE.h5", help="print a results file's table with the settings every result "
                   "was measured with, and exit (nothing is computed; give no other argument)")
    groups = {param.name: (f"metric {m.name}", m.summary) for m in REGISTRY.values() for param in m.params}
    cfg.add_arguments(p, cls, groups=groups)  # each metric's parameters under its name
    cfg.add_deprecated(p, DEPRECATED_FLAGS)
    args = cfg.apply_deprecated(p.parse_args(argv), DEPRECATED_FLAGS, "minima.sharpness")
    return cfg.resolve(cls, None, args)


def __getattr__(name: str) -> Any:
    if name == "MeasureRequest":  # the request class of the metrics registered now
        return measure_request_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.sharpness``: measure (or ``--show`` a results file); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--show" in args:  # python -m minima.sharpness --show FILE.h5: the table of a results file, nothing computed
        shown = cfg.ArgumentParser(prog="python -m minima.sharpness --show",
                                        description="print the results of a sharpness (or curve) file with the "
                                                    "settings each was measured with")
        shown.add_argument("--show", type=Path, required=True, metavar="FILE.h5")
        path = shown.parse_args(args).show
        return run_command("minima.sharpness", lambda: print(show(path)))

    def work() -> None:
        measure(parse_args(args))

    return run_command("minima.sharpness", work, user_errors=(NondeterministicLossError,),
                       interrupted="interrupted; finished metrics are saved — rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
