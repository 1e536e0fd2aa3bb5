"""How every command ends: exit status 0 on success, 2 and one line naming the problem for bad input (every
``ValueError`` — checkpoint, data, model, results and request errors all are — and ``OSError``: missing files,
failed downloads), a command's own statuses for its own outcomes, 130 after Ctrl-C with a hint on resuming. No
traceback reaches the user for any of these."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping

from minima.core.allocator import keep_freed_memory
from minima.core.distributed import is_main

EXIT_USAGE = 2
EXIT_SIGINT = 130


def duration(seconds: float) -> str:
    """A duration as every command prints it (estimates, time left, wall time): seconds below 90 s (one decimal
    below 10 s), minutes below 90 min, else hours."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def run_command(prog: str, work: Callable[[], object], *, user_errors: tuple[type[BaseException], ...] = (),
                statuses: Mapping[type[BaseException], int] | None = None, interrupted: str | None = None) -> int:
    """Run ``work()`` (after :func:`minima.core.allocator.keep_freed_memory`) and turn its outcome into an exit status:
    an exception of a type in ``statuses`` prints its message and returns that status; ``ValueError``,
    ``OSError`` and ``user_errors`` print ``[prog] error: …`` and return 2; ``KeyboardInterrupt`` prints
    ``interrupted`` (when given) and returns 130. A command that succeeds ends with its wall time (rank 0)."""
    statuses = dict(statuses or {})
    keep_freed_memory()
    t0 = time.perf_counter()
    try:
        work()
    except tuple(statuses) as exc:
        print(f"[{prog}] {exc}", file=sys.stderr, flush=True)
        return next(code for kind, code in statuses.items() if isinstance(exc, kind))
    except (ValueError, OSError, *user_errors) as exc:
        print(f"[{prog}] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"[{prog}] {interrupted}", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    if is_main():
        seconds = time.perf_counter() - t0
        print(f"[{prog}] done in {duration(seconds)}", flush=True)
    return 0
