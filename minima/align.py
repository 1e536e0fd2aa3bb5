"""``python -m minima.align A.pt B.pt``: permute B's hidden units to match A's (same function, new checkpoint).

The command: flags generated from :class:`minima.studies.align.AlignRequest`, then
:func:`minima.studies.align.align`. Interpolating between A and the aligned B (``python -m minima.interpolate A.pt
B_aligned_to_A.pt``) shows whether a barrier between them was a permutation artefact.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.studies.align import AlignRequest, align

__all__ = ["AlignRequest", "align", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> AlignRequest:
    """The :class:`~minima.studies.align.AlignRequest` of a command line (``sys.argv`` when ``argv`` is None)."""
    p = cfg.ArgumentParser(prog="python -m minima.align", description=__doc__.split("\n")[0])
    cfg.add_arguments(p, AlignRequest)
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    return cfg.resolve(AlignRequest, None, args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.align``: align B's hidden units to A's; returns the exit status (2 for bad input)."""
    req = parse_args(argv)
    return run_command("minima.align", lambda: align(req))


if __name__ == "__main__":
    sys.exit(main())
