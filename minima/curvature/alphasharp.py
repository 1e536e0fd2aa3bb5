"""Jiang et al.'s magnitude-aware sharpness α′ (ICLR 2020, the worst-case counterpart of the PAC-Bayes σ′), as the
PGDL competition's sharpness baseline computes it.

The network is measured as the function it computes in eval mode (BatchNorm folded, as for the norm and PAC-Bayes
measures). For a radius α the weights may move within the box |δ_i| ≤ α·|w_i| (every parameter of the folded network:
a weight that is 0 cannot move); a few steps of sign-gradient ascent on the mean cross-entropy of the measured images,
each of 2α|w_i|/steps and projected back onto the box, look for the worst δ; the accuracy at w + δ is compared with
the unperturbed accuracy. α′ is found by the bisection of :func:`minima.curvature.pacbayes.search_sigma` on [0, 2]:
the α whose accuracy drop is ``drop`` (0.1) within 0.01. The measure is 1/α′² (larger: sharper). Being relative to
|w_i|, α′ is invariant to rescaling a ReLU layer by c and the next by 1/c (the ascent's steps and the box scale with
the weights; tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from minima.core import distributed
from minima.curvature.pacbayes import SigmaSearch, accuracy, search_sigma
from minima.geometry.fold import fold_batchnorm


@dataclass(frozen=True)
class AlphaSearch:
    """The bisection's halvings, the ascent steps per radius, the accuracy drop sought and its tolerance."""

    depth: int = 12
    steps: int = 5
    drop: float = 0.1
    tolerance: float = 0.01


def worst_accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float,
                   steps: int) -> float:
    """The accuracy of eval-mode ``model`` after ``steps`` sign-gradient ascent steps within |δ_i| ≤ α·|w_i|
    (the sign of the gradient of the cross-entropy summed over every rank's ``batches``)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    box = {k: alpha * p.abs() for k, p in params.items()}
    delta = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(steps):
        moved = {k: (params[k] + delta[k]).requires_grad_() for k in params}
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        for x, y in batches:
            loss = F.cross_entropy(functional_call(model, (moved, buffers), (x,)), y, reduction="sum")
            for k, g in zip(moved, torch.autograd.grad(loss, list(moved.values())), strict=True):
                grads[k] += g
        flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads.values()]))
        offset = 0
        for k, p in params.items():  # every rank takes the same step from the same summed gradient (only its sign)
            g = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            delta[k] = torch.clamp(delta[k] + 2 * box[k] / steps * torch.sign(g), -box[k], box[k])
    return accuracy(model, batches, {k: params[k] + delta[k] for k in params})


def alpha_sharpness(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    search: AlphaSearch = AlphaSearch()) -> dict[str, float]:
    """α′ (``alpha``), the measure 1/α′² (``value``) and the unperturbed accuracy (``accuracy``)."""
    folded = fold_batchnorm(model).eval()
    base = accuracy(folded, batches)
    bisect = SigmaSearch(depth=search.depth, draws=1, drop=search.drop, tolerance=search.tolerance)
    alpha = search_sigma(lambda a: worst_accuracy(folded, batches, a, search.steps), base, bisect)
    return {"value": 1.0 / alpha ** 2, "alpha": alpha, "accuracy": base}
