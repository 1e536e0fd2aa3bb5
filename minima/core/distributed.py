"""torchrun environment, process-group setup/teardown, sum-reductions, and refusals every rank sees.

One launcher: ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the code runs as
a single process with no process group at all (so the same functions work in notebooks and tests).
The backend is ``nccl`` on CUDA and ``gloo`` on CPU. Only rank 0 writes files and prints progress.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

#: What a function run on one rank returns.
T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that prints and writes)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process runs (under torchrun)."""
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error saying so."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return dev


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the process group if launched by torchrun (``WORLD_SIZE`` > 1) and pick the device.

    Under torchrun on CUDA each process uses GPU ``LOCAL_RANK``. Calling it when a group already exists
    reuses that group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = process_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistEnv]:
    """:func:`setup` for a block, and :func:`teardown` after it only if this block created the process group: a study
    called by another one (``minima.curve --align`` calls the alignment) shares its caller's group."""
    owned = not (dist.is_available() and dist.is_initialized())
    env = setup(device)
    try:
        yield env
    finally:
        if owned:
            teardown()


def teardown() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank: torchrun's ``RANK``, 0 in a single process — the one answer, the same before, during and
    after the process group (``DistEnv.rank`` is read from it)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0, and in a single process (for code that holds no :class:`DistEnv`, e.g. a command's last
    line)."""
    return process_rank() == 0


def world_size() -> int:
    """The number of ranks of the current process group (1 in a single process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (returned; a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D CPU ``tensor`` concatenated in rank order, on every rank (``tensor`` itself in a single
    process): for statistics that do not reduce to sums, such as a percentile of per-sample values."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat([p for p in parts if isinstance(p, torch.Tensor)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer; ``flag`` itself in a single
    process, with no device round trip)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Refusal(ValueError):
    """Another rank refused the request (bad input, existing output, mismatched checkpoints): every rank raises
    this with that rank's one-line message, so every rank exits with the same status and no rank waits."""


_REFUSED = (ValueError, OSError)


def _share(env: DistEnv, error: BaseException | None, value: object = None, src: int | None = None,
           also: tuple[type[Exception], ...] = ()) -> object:
    """Every rank learns whether any rank failed with ``error``; with ``src``, also ``src``'s ``value``. The other
    ranks raise :class:`Refusal` — or, for an error of a type in ``also``, that type — with the failing rank's
    message."""
    if not env.distributed:
        if error is not None:
            raise error
        return value
    kinds = (*also, *_REFUSED)
    sent = None if error is None else (next(i for i, k in enumerate(kinds) if isinstance(error, k)), str(error))
    if src is None:
        gathered: list[tuple[int, str] | None] = [None] * env.world_size
        dist.all_gather_object(gathered, sent)
        first = next((m for m in gathered if m is not None), None)
    else:
        box = [(value, sent)]
        dist.broadcast_object_list(box, src=src)
        value, first = box[0]
    if error is not None:
        raise error
    if first is not None:
        kind, message = first
        raise kinds[kind](message) if kind < len(also) else Refusal(message)
    return value


def agree(env: DistEnv, work: Callable[[], T]) -> T:
    """``work()`` on every rank; if it refuses (``ValueError``/``OSError``) on any rank, it raises on every rank —
    the refusing rank its own error, the others :class:`Refusal` with the first refusing rank's message — instead
    of leaving the other ranks in a collective that never completes."""
    try:
        value, error = work(), None
    except _REFUSED as exc:
        value, error = None, exc
    _share(env, error)
    return value  # type: ignore[return-value]


def from_main(env: DistEnv, work: Callable[[], T], also: tuple[type[Exception], ...] = ()) -> T:
    """``work()`` on rank 0 only (file I/O), its result broadcast to every rank; a refusal on rank 0
    (``ValueError``/``OSError``, or an error of a type in ``also``) raises on every rank (:class:`Refusal` — or
    the ``also`` type — with rank 0's message on the others)."""
    value, error = None, None
    if env.is_main:
        try:
            value = work()
        except (*also, *_REFUSED) as exc:
            error = exc
    return _share(env, error, value, src=0, also=also)  # type: ignore[return-value]
