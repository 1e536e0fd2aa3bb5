"""The training loss as a function of the flat parameter vector: f(θ), ∇f(θ) and Hessian-vector products.

f(θ) = (1/N) Σ_i −log_softmax(model(x_i; θ))[y_i] over a fixed data split, with dropout off and an explicit
BatchNorm policy (``eval``: running statistics as stored; ``batch``: statistics of each fixed evaluation
batch, running statistics untouched — what Keskar's Keras code computed). θ is the concatenation of the
model's trainable parameters in ``named_parameters`` order. Values and gradients are accumulated over
batches in float64; under ``world_size > 1`` each rank takes a contiguous shard of the data and the sums are
all-reduced, so every rank gets the full-data result.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from minima import distributed
from minima.convgrad import constant_input_convs
from minima.data import Split, eval_batches, normalize, shard
from minima.evaluate import per_sample_cross_entropy, train_mode_for_bn_only
from minima.fold import folded_in_weights

BN_MODES = ("eval", "batch")


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


def default_hvp_cache_bytes(device: torch.device) -> int:
    """How much memory stored gradient graphs may take by default: a quarter of what is available on the
    device (2 GiB where that is unknown). C1 needs ≈ 0.67 GB per 1,000 float32 images."""
    available = available_memory_bytes(device)
    return 2 * 2**30 if available is None else available // 4


@contextlib.contextmanager
def _saved_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Count the bytes of the distinct tensor storages autograd saves inside the block (skipping the storages
    in ``exclude``, e.g. the parameters themselves): what keeping the recorded graph holds in memory."""
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


class NondeterministicLossError(RuntimeError):
    """Two evaluations of the same quantity disagree (augmentation, dropout or a nondeterministic kernel)."""


class DatasetObjective:
    """f, ∇f and H·v of the mean cross-entropy over ``split`` at parameters θ (a private model copy).

    ``hvp_cache_bytes`` caps the memory of the gradient graphs kept between Hessian-vector products at the
    same θ (see :meth:`hvp`); None: :func:`default_hvp_cache_bytes`, 0: keep none.
    """

    def __init__(
        self,
        model: nn.Module,
        split: Split,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        bn: str = "eval",
        batch_size: int = 1000,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        hvp_mode: str = "reverse",
        hvp_cache_bytes: int | None = None,
    ) -> None:
        if hvp_mode not in ("forward", "reverse"):
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose 'forward' or 'reverse'")
        self.hvp_mode = hvp_mode
        if bn not in BN_MODES:
            raise ValueError(f"unknown BatchNorm mode {bn!r}; choose one of {list(BN_MODES)}")
        self.bn, self.device, self.dtype = bn, torch.device(device), dtype
        self.model = copy.deepcopy(model).to(self.device, dtype=dtype)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # auto: first-order passes on channels_last copies of image batches, HVPs on the stored contiguous ones
        self.first_order_channels_last = channels_last is None and any(
            isinstance(m, nn.Conv2d) for m in self.model.modules())
        self.model.eval()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.count = len(split)  # N over all ranks
        mine = split if world_size == 1 else split.take(shard(torch.arange(len(split)), rank, world_size))
        # Normalised once: every f/∇f/Hv call reuses the same fixed batches.
        self.batches = [
            (normalize(x.to(self.device), mean, std, dtype, bool(channels_last)), y.to(self.device))
            for x, y in eval_batches(mine, batch_size)
        ]
        self.world_size = world_size
        self.evaluations = {"f": 0, "grad": 0, "hvp": 0}
        self.hvp_cache_bytes = default_hvp_cache_bytes(self.device) if hvp_cache_bytes is None else hvp_cache_bytes
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graph_bytes = 0

    # ----------------------------------------------------------------------------------- θ as a vector
    def get_flat(self) -> torch.Tensor:
        """θ as a float64 CPU vector."""
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in self.params])

    def set_flat(self, theta: torch.Tensor) -> None:
        """Write the vector θ into the model's parameters."""
        theta = torch.as_tensor(theta)
        if theta.numel() != self.numel:
            raise ValueError(f"parameter vector has {theta.numel()} entries; the model has {self.numel}")
        self.clear_hvp_cache()  # stored gradient graphs belong to the old θ
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(theta[offset : offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()

    def split_flat(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector as a list shaped like the parameters (model dtype and device)."""
        out, offset = [], 0
        for p in self.params:
            out.append(vector[offset : offset + p.numel()].view_as(p).to(self.device, p.dtype))
            offset += p.numel()
        return out

    def _reduced_flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        # Reduce on the compute device (NCCL needs device tensors), then hand back a float64 CPU vector.
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        return distributed.all_reduce_sum(flat).cpu()

    # --------------------------------------------------------------------------------------- f and ∇f
    def _first_order_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches in the layout f and ∇f run fastest in (channels_last for images with ``channels_last``
        None: C1's forward+backward on 1,000 images took 0.90 s against 1.23 s contiguous here; a copy per
        batch is ≈ 1 % of that). HVPs use the stored contiguous batches, where PyTorch's double backward of
        convolutions is faster (a C1 HVP from a stored graph 1.67 s contiguous, ≈ 2.2 s channels_last)."""
        for x, y in self.batches:
            if self.first_order_channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Sum over the batch divided by the global count: batch terms add up to the dataset mean.
        return per_sample_cross_entropy(self.model(x), y).sum() / self.count

    def value(self, theta: torch.Tensor | None = None) -> float:
        """f(θ) (at the current parameters if ``theta`` is None)."""
        if theta is not None:
            self.set_flat(theta)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), self._function():
            for x, y in self._first_order_batches():
                total += self._batch_loss(x, y).to(torch.float64)
        self.evaluations["f"] += 1
        return float(distributed.all_reduce_sum(total))

    def value_and_grad(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """(f(θ), ∇f(θ)) with the gradient as a float64 CPU vector."""
        if theta is not None:
            self.set_flat(theta)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        with self._function():
            for x, y in self._first_order_batches():
                loss = self._batch_loss(x, y)
                for acc, g in zip(grads, torch.autograd.grad(loss, self.params), strict=True):
                    acc += g
                total += loss.detach().to(torch.float64)
        flat = self._reduced_flat(grads)
        self.evaluations["grad"] += 1
        return float(distributed.all_reduce_sum(total)), flat

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H(θ)·v at the current parameters, summed over batches (float64 CPU vector).

        ``hvp_mode="reverse"`` (default) back-propagates through the gradient (reverse over reverse);
        ``"forward"`` differentiates the gradient forward along v (``torch.func.jvp`` of ``torch.func.grad``),
        a cross-check (measured on CPU, BN-MLP, 1,000 images: reverse 2.2×, forward 3.7× a forward+backward).

        Reverse mode keeps each batch's gradient graph g(θ) (built with ``create_graph``) between calls while
        θ is unchanged and the graphs fit in ``hvp_cache_bytes``: H·v = (∂g/∂θ)ᵀ v is then one backward pass
        through a stored graph, without the forward and first backward passes that every product at the same
        θ would otherwise repeat (what Lanczos, Hutchinson and SLQ do). :meth:`set_flat` drops the graphs.
        """
        return self._hvp(vector, store=True)

    def _hvp(self, vector: torch.Tensor, store: bool) -> torch.Tensor:
        v = self.split_flat(torch.as_tensor(vector, dtype=torch.float64))
        out = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        for i, (x, y) in enumerate(self.batches):
            if self.hvp_mode == "forward":
                with self._function():
                    parts = self._hvp_forward(x, y, v)
            else:
                grads, keep = self._gradient_graph(i, x, y, store)
                parts = self._vjp(grads, v, keep)
            for acc, h in zip(out, parts, strict=True):
                acc += h
        self.evaluations["hvp"] += 1
        return self._reduced_flat(out)

    def clear_hvp_cache(self) -> None:
        """Forget the stored gradient graphs (the next HVP rebuilds them)."""
        self._graphs.clear()
        self._graph_bytes = 0

    @property
    def hvp_cache_info(self) -> dict[str, int]:
        """``{"batches": stored graphs, "bytes": their saved tensors, "limit": hvp_cache_bytes}``."""
        return {"batches": len(self._graphs), "bytes": self._graph_bytes, "limit": self.hvp_cache_bytes}

    def _gradient_graph(self, index: int, x: torch.Tensor, y: torch.Tensor,
                        store: bool) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(g = ∇ of batch ``index``'s loss with its graph, whether that graph is stored for later products;
        never stored unless ``store``)."""
        if index in self._graphs:
            return self._graphs[index], True
        own = {p.untyped_storage().data_ptr() for p in self.params}
        with self._function(), constant_input_convs(self.model), _saved_bytes(exclude=own) as size:
            # Data-input convolutions skip PyTorch's unneeded ∂/∂images term in the double backward.
            grads = torch.autograd.grad(self._batch_loss(x, y), self.params, create_graph=True)
        keep = store and self._graph_bytes + size[0] <= self.hvp_cache_bytes
        if keep:
            self._graphs[index] = grads
            self._graph_bytes += size[0]
        return grads, keep

    def _vjp(self, grads: Sequence[torch.Tensor], v: Sequence[torch.Tensor], retain: bool) -> list[torch.Tensor]:
        """(∂g/∂θ)ᵀ v for the gradient g with its graph: the HVP, since the Hessian is symmetric."""
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has a zero Hessian row
        parts = torch.autograd.grad([grads[i] for i in live], self.params, [v[i] for i in live],
                                    retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for p, h in zip(self.params, parts, strict=True)]

    @contextlib.contextmanager
    def _function(self) -> Iterator[None]:
        """The network as the function f is defined on: dropout off; with ``bn="batch"`` BatchNorm on each
        batch's statistics, with ``bn="eval"`` the running statistics folded into the preceding layers'
        weights (:func:`minima.fold.folded_in_weights`: same function and derivatives, no activation-sized
        BatchNorm work — one C1 HVP on 500 images here went from 4.30 s to 2.72 s in contiguous format and from
        2.87 s to 2.28 s in channels_last, default allocator)."""
        with train_mode_for_bn_only(self.model, self.bn == "batch"):
            if self.bn == "eval":
                with folded_in_weights(self.model):
                    yield
            else:
                yield

    def _hvp_forward(self, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        buffers = dict(self.model.named_buffers())

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(self.model, (params, buffers), (x,))
            return per_sample_cross_entropy(logits, y).sum() / self.count

        primals = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}
        tangents = dict(zip(self.names, v, strict=True))
        _, hv = jvp(grad(loss), (primals,), (tangents,))
        return tuple(hv[n] for n in self.names)

    def check_deterministic(self, seed: int = 0, rtol: float = 1e-4) -> None:
        """Evaluate H·v twice for one random v; raise if they differ (as curvlinops checks), so that
        augmentation, dropout or stateful layers cannot silently corrupt curvature estimates."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(self.numel, generator=gen, dtype=torch.float64)
        # Both products run the network (no stored graph is reused); only the second one's graphs are kept, so
        # that memory is not filled, freed and filled again.
        self.clear_hvp_cache()
        first = self._hvp(v, store=False)
        second = self._hvp(v, store=True)
        scale = float(first.abs().max()) or 1.0
        if float((first - second).abs().max()) > rtol * scale:
            raise NondeterministicLossError(
                "two Hessian-vector products at the same point disagree (max difference "
                f"{float((first - second).abs().max()):.3g}, scale {scale:.3g}); is dropout or augmentation on, "
                "or a nondeterministic kernel in use?")
