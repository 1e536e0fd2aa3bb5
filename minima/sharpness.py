"""``python -m minima.sharpness A.pt [B.pt …]``: sharpness and curvature of checkpoints into an HDF5 file.

The command: flags generated from :class:`minima.measure.MeasureRequest` (common settings plus every parameter of
the metrics registered in :mod:`minima.metrics`), then :func:`minima.measure.measure`. The metric functions are
importable from here as documented (they live in :mod:`minima.sharpness_metrics`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from minima import config as cfg
from minima.cli import run_command
from minima.measure import MeasureRequest, measure
from minima.objective import NondeterministicLossError
from minima.sharpness_metrics import (
    DenseSubspace,
    RandomSubspace,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
)

__all__ = ["DenseSubspace", "RandomSubspace", "adaptive_sharpness", "average_sharpness", "keskar_sharpness", "main",
           "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> MeasureRequest:
    p = argparse.ArgumentParser(prog="python -m minima.sharpness", description=__doc__.split("\n")[0])
    cfg.add_arguments(p, MeasureRequest)
    return cfg.resolve(MeasureRequest, None, p.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    req = parse_args(argv)
    return run_command("minima.sharpness", lambda: measure(req), user_errors=(NondeterministicLossError,),
                       interrupted="interrupted; finished metrics are saved — rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
