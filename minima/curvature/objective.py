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
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from minima.core import distributed
from minima.core.vocab import BNMode, Loss, check_choice
from minima.curvature.convgrad import constant_input_convs
from minima.curvature.graphcache import GraphCache, saved_bytes
from minima.data import Split, shard
from minima.geometry.evaluate import Batching, bn_mode, per_sample_loss
from minima.geometry.fold import folded_in_weights
from minima.models import is_convolutional

HVP_MODES = ("reverse", "forward")


class NondeterministicLossError(RuntimeError):
    """Two evaluations of the same quantity disagree (augmentation, dropout or a nondeterministic kernel)."""


class FixedBatches:
    """The data f is defined on: this rank's shard of a split, normalised once into fixed batches on the device,
    and the reduction that turns per-rank sums into sums over the whole split (``count`` samples)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], count: int, device: torch.device,
                 dtype: torch.dtype, local: bool = False) -> None:
        if count < 1:
            raise ValueError("the objective needs at least one sample")
        self.batches, self.count, self.device, self.dtype = batches, int(count), torch.device(device), dtype
        self.local = local  # this rank's own data only: sums are not reduced over ranks

    @classmethod
    def from_split(
        cls, split: Split, mean: Sequence[float], std: Sequence[float], feed: Batching = Batching(), *,
        rank: int = 0, world_size: int = 1,
    ) -> FixedBatches:
        """Rank ``rank``'s contiguous shard of ``split`` (all of it for one rank) fed as ``feed`` says (batch size,
        device, dtype), normalised once with the training statistics ``mean``/``std``."""
        mine = split if world_size == 1 else split.take(shard(torch.arange(len(split)), rank, world_size))
        return cls(list(feed.batches(mine, mean, std)), len(split), torch.device(feed.device), feed.dtype)

    def __len__(self) -> int:
        return len(self.batches)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of this rank's ``tensor`` over all ranks (itself in one process, or for ``local`` data)."""
        return tensor if self.local else distributed.all_reduce_sum(tensor)

    def sum(self, per_batch: Callable[[int, torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
            like: Sequence[torch.Tensor], batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
            ) -> list[torch.Tensor]:
        """Σ over this rank's batches of ``per_batch(index, x, y)`` (tensors shaped like ``like``), accumulated in
        float64 on the device, then summed over ranks. ``batches`` replaces the stored ones (e.g. another layout
        of the same batches)."""
        acc = [torch.zeros_like(t, dtype=torch.float64) for t in like]
        for i, (x, y) in enumerate(self.batches if batches is None else batches):
            for a, part in zip(acc, per_batch(i, x, y), strict=True):
                a += part
        if len(acc) == 1:
            return [self.reduce(acc[0])]
        flat = self.reduce(torch.cat([a.reshape(-1) for a in acc]))
        return list(torch.split(flat, [a.numel() for a in acc]))


class DatasetObjective:
    """f, ∇f and H·v of the mean cross-entropy over fixed ``data`` at parameters θ (of a private model copy).

    ``bn``: the BatchNorm mode inside f. ``hvp_cache_bytes``: memory budget for gradient graphs kept between
    Hessian-vector products at one θ (:mod:`minima.curvature.graphcache`; 0 keeps none — the numbers are the same either
    way). ``channels_last``: None (default) runs f and ∇f of convolutional models on channels_last copies of the
    batches and HVPs on the stored contiguous ones (each the faster layout for its pass on CPU, see docs/benchmarks.md);
    True/False put everything in that layout. ``hvp_mode``: ``reverse`` (reverse over reverse, stored graphs) or
    ``forward`` (``torch.func.jvp`` of ``torch.func.grad``, a cross-check).
    """

    def __init__(self, model: nn.Module, data: FixedBatches, *, bn: BNMode = "eval", hvp_cache_bytes: int = 0,
                 channels_last: bool | None = None, hvp_mode: str = "reverse", loss: Loss = "cross_entropy") -> None:
        check_choice("BatchNorm mode", bn, BNMode)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {hvp_mode!r}; choose one of {list(HVP_MODES)}")
        self.bn, self.hvp_mode, self.data, self.loss = bn, hvp_mode, data, loss
        self.device, self.dtype = data.device, data.dtype
        self.model = copy.deepcopy(model).to(self.device, dtype=self.dtype).eval()
        self.batches = data.batches
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.batches = [(_channels_last(x), y) for x, y in data.batches]
        self.first_order_channels_last = channels_last is None and is_convolutional(self.model)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.count = data.count
        self.evaluations = {"f": 0, "grad": 0, "hvp": 0}
        # called with "f", "grad" or "hvp" after each evaluation over the data (progress bars; None: nothing)
        self.observer: Callable[[str], None] | None = None
        self.cache = GraphCache(hvp_cache_bytes)

    @property
    def hvp_cache_bytes(self) -> int:
        """The memory budget for gradient graphs kept between Hessian-vector products, in bytes."""
        return self.cache.limit_bytes

    @property
    def hvp_cache_info(self) -> dict[str, int]:
        """``{"batches": stored graphs, "bytes": their saved tensors, "limit": hvp_cache_bytes}``."""
        return self.cache.info

    def clear_hvp_cache(self) -> None:
        """Forget the stored gradient graphs (the next HVP rebuilds them)."""
        self.cache.clear()

    # ----------------------------------------------------------------------------------- θ as a vector
    @property
    def vector_device(self) -> torch.device:
        """Where θ, ∇f and H·v vectors live: the data's device (curvature never round-trips through the host)."""
        return self.device

    def get_flat(self) -> torch.Tensor:
        """θ as a float64 vector on :attr:`vector_device`."""
        return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.params])

    def set_flat(self, theta: torch.Tensor) -> None:
        """Write the vector θ into the model's parameters (and drop the gradient graphs of the old θ)."""
        theta = torch.as_tensor(theta)
        if theta.numel() != self.numel:
            raise ValueError(f"parameter vector has {theta.numel()} entries; the model has {self.numel}")
        self.cache.clear()
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

    @staticmethod
    def _flat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in parts]).to(torch.float64)

    # ------------------------------------------------------------------------- per batch: f, ∇f, H·v
    def _batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Sum over the batch divided by the global count: batch terms add up to the dataset mean.
        return per_sample_loss(self.model(x), y, self.loss).sum() / self.count

    def _batch_value(self, _index: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        return (self._batch_loss(x, y).to(torch.float64),)

    def _batch_value_and_grad(self, _index: int, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        loss = self._batch_loss(x, y)
        return [loss.detach().to(torch.float64), *torch.autograd.grad(loss, self.params)]

    def _batch_hvp(self, index: int, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor],
                   store: bool) -> Sequence[torch.Tensor]:
        if self.hvp_mode == "forward":
            with self._function():
                return self._hvp_forward(x, y, v)
        grads, keep = self._gradient_graph(index, x, y, store)
        return self._vjp(grads, v, keep)

    def _first_order_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The batches f and ∇f run on: channels_last copies of image batches when ``channels_last`` is None and
        the model is convolutional (a copy per batch is ≈ 1 % of a pass), else the stored ones (None)."""
        if not self.first_order_channels_last:
            return None
        return [(_channels_last(x) if x.dim() == 4 else x, y) for x, y in self.batches]

    # ------------------------------------------------------------------------------ over the data split
    def value(self, theta: torch.Tensor | None = None) -> float:
        """f(θ) (at the current parameters if ``theta`` is None)."""
        if theta is not None:
            self.set_flat(theta)
        zero = torch.zeros((), device=self.device)
        with torch.no_grad(), self._function():
            (total,) = self.data.sum(self._batch_value, [zero], self._first_order_batches() or self.batches)
        self.evaluations["f"] += 1
        if self.observer is not None:
            self.observer("f")
        return float(total)

    def value_and_grad(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """(f(θ), ∇f(θ)) with the gradient as a float64 vector on :attr:`vector_device`."""
        if theta is not None:
            self.set_flat(theta)
        zero = torch.zeros((), device=self.device)
        with self._function():
            total, *grads = self.data.sum(self._batch_value_and_grad, [zero, *self.params],
                                          self._first_order_batches() or self.batches)
        self.evaluations["grad"] += 1
        if self.observer is not None:
            self.observer("grad")
        return float(total), self._flat(grads)

    def hvp(self, vector: torch.Tensor) -> torch.Tensor:
        """H(θ)·v at the current parameters, summed over batches (a float64 vector on :attr:`vector_device`; ``v``
        may be on the host or the device).

        Reverse mode keeps each batch's gradient graph g(θ) between calls while θ is unchanged and the graphs
        fit in the budget: H·v = (∂g/∂θ)ᵀ v is then one backward pass through a stored graph. :meth:`set_flat`
        drops the graphs.
        """
        return self._hvp(vector, store=True)

    def _hvp(self, vector: torch.Tensor, store: bool) -> torch.Tensor:
        v = self.split_flat(torch.as_tensor(vector, dtype=torch.float64, device=self.device))
        parts = self.data.sum(lambda i, x, y: self._batch_hvp(i, x, y, v, store), self.params, self.batches)
        self.evaluations["hvp"] += 1
        if self.observer is not None:
            self.observer("hvp")
        return self._flat(parts)

    def ggn_vp(self, vector: torch.Tensor) -> torch.Tensor:
        """G(θ)·v for the generalised Gauss–Newton matrix G = (1/N) Σ_i J_iᵀ H_i J_i of the loss (J_i: the Jacobian of
        sample i's logits in θ; H_i: the loss's Hessian in the logits, diag(p_i) − p_i p_iᵀ for cross-entropy, I for
        MSE), positive semi-definite; equal to the Hessian when the logits are linear in θ. One forward-mode and one
        reverse-mode pass per batch (``torch.func.jvp`` and ``vjp``), in the function f is defined on (BatchNorm mode,
        folding)."""
        return self._output_vp(vector, self._ggn_weights)

    def _ggn_weights(self, index: int, y: torch.Tensor, z: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
        """H_out·(J v) per sample: J v itself for MSE, (diag p − p pᵀ)(J v) for cross-entropy."""
        if self.loss == "mse":  # ½‖f − y‖²: H_out = I
            return jv
        prob = torch.softmax(z, dim=1)
        return prob * jv - prob * (prob * jv).sum(dim=1, keepdim=True)

    def fisher_vp(self, vector: torch.Tensor, kind: str = "empirical", seed: int = 0) -> torch.Tensor:
        """F(θ)·v for a Fisher matrix F = (1/N) Σ_i g_i g_iᵀ, g_i = J_iᵀ r_i the gradient of sample i's loss in θ
        (J_i: the Jacobian of its logits; r_i: the loss's gradient in the logits). ``kind="empirical"``: the data's
        own labels (r_i = p_i − e_{y_i} for cross-entropy, f_i − y_i for MSE) — the empirical Fisher, which is not
        a curvature matrix in general; ``kind="mc"``: one label per sample drawn from the model's predictive
        (ŷ_i ~ softmax(f_i); for MSE y ~ N(f_i, I)), seeded by (``seed``, rank, batch) so that every product uses
        the same draw — an unbiased Monte-Carlo estimate of the exact Fisher, which equals the generalised
        Gauss–Newton matrix for these losses. One forward-mode and one reverse-mode pass per batch:
        g_iᵀv = r_iᵀ(J_i v), then Jᵀ of the weights r_i·(r_iᵀ J_i v)/N."""
        if kind not in ("empirical", "mc"):
            raise ValueError(f"unknown Fisher kind {kind!r}; choose 'empirical' or 'mc'")

        def weights(index: int, y: torch.Tensor, z: torch.Tensor, jv: torch.Tensor) -> torch.Tensor:
            r = self._loss_gradient(index, y, z, kind, seed)
            return r * (r * jv).sum(dim=1, keepdim=True)  # r_i (r_iᵀ J_i v), per sample

        return self._output_vp(vector, weights)

    def _loss_gradient(self, index: int, y: torch.Tensor, z: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
        """r_i, the gradient of sample i's loss in its logits z_i, at the data's label or (``mc``) one drawn from the
        model with a generator seeded by (``seed``, rank, batch ``index``)."""
        draw = (torch.Generator().manual_seed((seed * 1_000_003 + distributed.process_rank()) * 1_000_003 + index)
                if kind == "mc" else None)
        if self.loss == "mse":  # ½‖f − y‖²: r = f − y
            target = (torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype) if draw is None else
                      z + torch.randn(z.shape, generator=draw, dtype=torch.float64).to(z.device))
            return z - target
        prob = torch.softmax(z, dim=1)
        labels = y if draw is None else torch.multinomial(prob.cpu(), 1, generator=draw)[:, 0].to(z.device)
        return prob - torch.nn.functional.one_hot(labels, z.shape[1]).to(z.dtype)

    def _output_vp(self, vector: torch.Tensor,
                   weights: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(1/N) Σ_i J_iᵀ u_i with u_i = ``weights(batch index, labels, logits, J v)`` per sample (float64): the
        product of every matrix of the form Jᵀ M J (the GGN, the Fisher matrices), one forward-mode and one
        reverse-mode pass per batch (``torch.func.jvp`` and ``vjp``) in the function f is defined on (BatchNorm
        mode, folding); counted as one Hessian-vector product."""
        v = self.split_flat(torch.as_tensor(vector, dtype=torch.float64, device=self.device))
        tangents = dict(zip(self.names, v, strict=True))
        buffers = dict(self.model.named_buffers())
        primals = {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

        def batch(index: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            def logits_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
                return functional_call(self.model, (params, buffers), (x,))

            with self._function():
                logits, jv = jvp(logits_of, (primals,), (tangents,))
                u = weights(index, y, logits.to(torch.float64), jv.to(torch.float64))
                _, pull = vjp(logits_of, primals)
                (out,) = pull((u / self.count).to(logits.dtype))
            return tuple(out[n] for n in self.names)

        parts = self.data.sum(batch, self.params, self.batches)
        self.evaluations["hvp"] += 1
        if self.observer is not None:
            self.observer("hvp")
        return self._flat(parts)

    def _gradient_graph(self, index: int, x: torch.Tensor, y: torch.Tensor,
                        store: bool) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(g = ∇ of batch ``index``'s loss with its graph, whether that graph is stored for later products;
        never stored unless ``store``)."""
        stored = self.cache.get(index)
        if stored is not None:
            return stored, True
        own = {p.untyped_storage().data_ptr() for p in self.params}
        with self._function(), constant_input_convs(self.model), saved_bytes(exclude=own) as size:
            # Data-input convolutions skip PyTorch's unneeded ∂/∂images term in the double backward.
            grads = torch.autograd.grad(self._batch_loss(x, y), self.params, create_graph=True)
        keep = store and self.cache.offer(index, grads, size[0])
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
        weights (:func:`minima.geometry.fold.folded_in_weights`: same function and derivatives, no activation-sized
        BatchNorm work)."""
        with bn_mode(self.model, self.bn):
            if self.bn == "eval":
                with folded_in_weights(self.model):
                    yield
            else:
                yield

    def _hvp_forward(self, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        buffers = dict(self.model.named_buffers())

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(self.model, (params, buffers), (x,))
            return per_sample_loss(logits, y, self.loss).sum() / self.count

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


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
