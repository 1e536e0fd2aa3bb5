"""Where the evaluated or trained data lives: on the compute device when it fits, else in pinned host memory with
one batch of asynchronous prefetch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from minima.core.allocator import available_memory_bytes
from minima.core.vocab import DataOnDevice
from minima.data.splits import DataError, Split


@dataclass(frozen=True)
class Placement:
    """Where the data of a run lives: on the compute device (``resident``: batches are gathered, augmented and
    normalised there, with no host copy per step), or in page-locked host memory (``pinned``: one asynchronous
    copy per batch). On a CPU the host memory is the device's: always resident."""

    policy: str
    resident: bool
    pinned: bool
    device: str

    def describe(self) -> dict[str, Any]:
        """The placement as a JSON-able record (what result files store under ``data_placement``)."""
        return {"policy": self.policy, "resident": self.resident, "pinned": self.pinned, "device": self.device}


def decide_placement(policy: DataOnDevice, device: torch.device, nbytes: int, free_bytes: int | None,
                     share: float = 0.5) -> Placement:
    """``auto``: on the device when the data takes at most ``share`` of its free memory; ``yes``: on the device
    (refused, naming the sizes, when it cannot fit at all); ``no``: pinned host memory."""
    if policy not in ("auto", "yes", "no"):
        raise DataError(f"unknown data placement {policy!r}; choose auto, yes or no")
    if device.type == "cpu":
        return Placement(policy, True, False, str(device))
    if policy == "yes" and free_bytes is not None and nbytes > free_bytes:
        raise DataError(f"the data needs {nbytes / 1e9:.2f} GB but {device} has {free_bytes / 1e9:.2f} GB free; use "
                        "--data-on-device auto or no")
    resident = policy == "yes" or (policy == "auto" and free_bytes is not None and nbytes <= share * free_bytes)
    return Placement(policy, resident, not resident, str(device))


def place(splits: Sequence[Split], policy: DataOnDevice, device: torch.device) -> tuple[list[Split], Placement]:
    """``splits`` where :func:`decide_placement` puts them (together), and the decision."""
    total = sum(s.nbytes for s in splits)
    free = available_memory_bytes(device) if device.type == "cuda" else None
    where = decide_placement(policy, device, total, free)
    if device.type == "cpu":
        return list(splits), where
    return [s.to(device) if where.resident else s.pin_memory() for s in splits], where


class DeviceBatches:
    """The batches ``split[chunk]`` for ``chunks`` in order, on ``device``. With pinned host data the next batch is
    gathered into page-locked memory and its asynchronous copy issued before the current one is handed out (one
    batch of prefetch), so the copy overlaps the computation; with resident data it is plain indexing."""

    def __init__(self, split: Split, chunks: Sequence[torch.Tensor], device: torch.device, pinned: bool) -> None:
        self.split, self.chunks, self.device, self.pinned = split, chunks, device, pinned

    def _fetch(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.images[chunk], self.split.labels[chunk]
        if self.pinned:  # a gathered batch is pageable: pin it so the copy is asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.pinned:
            for chunk in self.chunks:
                yield self._fetch(chunk)
            return
        ahead = self._fetch(self.chunks[0]) if len(self.chunks) else None
        for k in range(len(self.chunks)):
            current = ahead
            ahead = self._fetch(self.chunks[k + 1]) if k + 1 < len(self.chunks) else None
            yield current

