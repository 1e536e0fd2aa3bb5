"""Sharpness-aware minimisation: SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021) around any base
optimiser, and SAM's stability edge.

**One step** at weights θ on a batch B, with g = ∇L_B(θ) the loss gradient (no weight decay in it):

* SAM: ε = ρ · g / ‖g‖ — a step of length ρ (in parameter units) up the gradient;
* ASAM: ε = ρ · T²g / ‖Tg‖ with T = diag(|θ| + η) — a step of length ρ measured in the scaled coordinates,
  ‖T⁻¹ε‖ = ρ, so rescaling a layer's weights (which leaves a ReLU network's function unchanged) rescales ε with
  them. davda54/sam (the implementation the field cites) uses η = 0; Kwon et al.'s own code η = 0.01 (and T = 1 on
  biases, which this form does not copy).

The norms are over all parameters as one vector, with davda54/sam's guard ``ρ / (‖·‖ + 1e-12)``. Then the gradient
at θ + ε on the same batch, θ restored exactly (a saved copy, not θ + ε − ε, which rounds differently), and the base
optimiser's step with that gradient: weight decay, momentum, Adam's moments and the learning-rate schedule are all
the base optimiser's. BatchNorm's running statistics are updated by the first forward pass only
(:func:`frozen_running_stats` around the second).

**SAM's stability edge** (:func:`sam_edge`). Full-batch SAM on a quadratic with curvature λ along the gradient moves
with the effective curvature λ(1 + ρλ/‖g‖): the gradient at θ + ρg/‖g‖ is g + ρλ·g/‖g‖ along that eigenvector. The
base optimiser's threshold c (2/η for gradient descent, 2(1 + β)/η with heavy-ball momentum β) then bounds
λ + ρλ²/‖g‖ ≤ c, i.e. λ ≤ λ_SAM = (‖g‖/2ρ)(√(1 + 4ρc/‖g‖) − 1), which is (‖g‖/2ρ)(√(1 + 8ρ/(η‖g‖)) − 1) for
gradient descent (Long & Bartlett, JMLR 2024; Agarwala & Dauphin 2023) and tends to c as ρ → 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

GUARD = 1e-12  # davda54/sam's ρ / (‖g‖ + 1e-12)


@torch.no_grad()
def ascent(params: Sequence[torch.Tensor], rho: float, adaptive: bool, eta: float = 0.0
           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move every parameter with a gradient to θ + ε (see the module docstring); return ``(parameter, saved θ)``
    pairs for :func:`restore` (parameters without a gradient are neither moved nor saved)."""
    live = [p for p in params if p.grad is not None]
    scales = [p.abs() + eta for p in live] if adaptive else [None] * len(live)
    norms = [torch.linalg.vector_norm(p.grad if t is None else t * p.grad) for p, t in zip(live, scales, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    factor = rho / (norm + GUARD)
    saved = []
    for p, t in zip(live, scales, strict=True):
        saved.append((p, p.detach().clone()))
        step = p.grad * factor if t is None else t * t * p.grad * factor
        p.add_(step.to(p.dtype))
    return saved


@torch.no_grad()
def restore(saved: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the weights :func:`ascent` saved."""
    for p, s in saved:
        p.copy_(s)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics (and their batch counters) as they were on entry, whatever the forwards inside
    do: SAM's second pass, at θ + ε, must not move them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    kept = [{k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, kept, strict=True):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def sam_edge(base_threshold: float, rho: float, grad_norm: float) -> float:
    """λ_SAM: the largest curvature along the gradient at which full-batch SAM with radius ``rho`` and gradient norm
    ``grad_norm`` is stable, given the base optimiser's threshold ``base_threshold`` (2/η, 2(1 + β)/η); the base
    threshold itself at ρ = 0, NaN where the base has none or the gradient vanishes."""
    if not math.isfinite(base_threshold) or not grad_norm > 0:
        return float("nan")
    if rho == 0:
        return base_threshold
    a = 4 * rho * base_threshold / grad_norm
    # (‖g‖/2ρ)(√(1 + a) − 1) written as (‖g‖/2ρ)·a/(√(1 + a) + 1): no cancellation for small ρ
    return grad_norm / (2 * rho) * a / (math.sqrt(1 + a) + 1)
