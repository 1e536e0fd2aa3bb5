"""Gradient graphs kept between Hessian-vector products at one θ, within a memory budget.

A reverse-over-reverse HVP first builds g(θ) = ∇f_batch(θ) with its graph (``create_graph=True``), then
back-propagates v through it: H·v = (∂g/∂θ)ᵀ v. While θ stays put, the graph of g is the same for every v, so
keeping it turns every later product into one backward pass (what Lanczos, Hutchinson and SLQ do: many products
at one point). The memory a graph holds is measured exactly — the distinct storages autograd saves while it is
built (:func:`saved_bytes`) — and graphs are kept only while their total stays within the budget the caller
passes in; batches beyond it are recomputed for every product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


@contextlib.contextmanager
def saved_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Count the bytes of the distinct tensor storages autograd saves inside the block (skipping the storages in
    ``exclude``, e.g. the parameters themselves): what keeping the recorded graph holds in memory. The count is
    in the list's only element once the block has run."""
    total, seen = [0], set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # layouts without a storage (mkldnn, sparse)
            key, size = id(t), t.element_size() * t.numel()
        if key not in seen:
            seen.add(key)
            total[0] += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


class GraphCache:
    """Per-batch gradient graphs, keyed by batch index, within ``limit_bytes`` (0: keep none)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError(f"the gradient-graph memory budget must be ≥ 0 bytes; got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._bytes = 0

    def get(self, index: int) -> tuple[torch.Tensor, ...] | None:
        """The stored gradients (with graphs) of batch ``index``, or None."""
        return self._graphs.get(index)

    def offer(self, index: int, grads: Sequence[torch.Tensor], nbytes: int) -> bool:
        """Keep ``grads`` (whose graph holds ``nbytes``) if the budget allows; return whether it was kept."""
        if self._bytes + nbytes > self.limit_bytes:
            return False
        self._graphs[index] = tuple(grads)
        self._bytes += nbytes
        return True

    def clear(self) -> None:
        """Forget every graph (θ moved)."""
        self._graphs.clear()
        self._bytes = 0

    @property
    def info(self) -> dict[str, int]:
        """``{"batches": stored graphs, "bytes": their saved tensors, "limit": the budget}``."""
        return {"batches": len(self._graphs), "bytes": self._bytes, "limit": self.limit_bytes}
