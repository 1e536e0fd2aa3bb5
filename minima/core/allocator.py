"""Process memory: the CPU allocator setting that makes PyTorch on CPU markedly faster, and how much memory a
device has left (:func:`available_memory_bytes`, read by the commands to size memory budgets they pass down).

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and returns it to the kernel on ``free``. A CIFAR batch of activations (1000 × 64 × 32 × 32 float32 =
262 MB) is far above that, so every forward pass maps new memory and page-faults on every 4 KiB page the
first time it is written — on a virtual machine each fault is expensive. :func:`keep_freed_memory` tells
glibc (``mallopt``) to serve large blocks from the heap and never trim it, so freed activation buffers are
reused without faults (the speed-up on this project's machines is in ``docs/benchmarks.md``).

The cost: memory freed by the process is kept for reuse rather than given back to the kernel, so the
resident size stays at its high-water mark, and that mark is higher: a freed block is reused only once
neighbours have coalesced with it (PyTorch's 64-byte-aligned requests do not fit the exact freed size), so a
few spare copies of the largest buffers stay resident (``docs/benchmarks.md`` has peak resident sizes
with and without it). The command-line entry
points call it; library users call it once at the top of a script or notebook. ``MINIMA_MALLOC=default`` in
the environment switches it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc malloc keep and reuse freed memory (no per-tensor ``mmap``); return whether it applied.

    Returns False without changing anything where the C library has no ``mallopt`` (macOS, musl) or when
    ``MINIMA_MALLOC=default`` is set.
    """
    if os.environ.get("MINIMA_MALLOC", "").lower() == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or a libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both calls return 1 on success; large blocks come from the heap, and the heap is never trimmed.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device``: free CUDA memory, or Linux's MemAvailable (RAM not
    needed by running programs, page cache included); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(device: torch.device, fraction: float = 0.25, fallback_bytes: int = 2 * 2**30) -> int:
    """``fraction`` of :func:`available_memory_bytes` (``fallback_bytes`` where that is unknown)."""
    available = available_memory_bytes(device)
    return fallback_bytes if available is None else int(available * fraction)


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (``/proc/cpuinfo``), else the platform's machine type: the
    machine every measured figure names."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
