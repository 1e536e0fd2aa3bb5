"""PAC-Bayes flatness measures (Jiang et al. 2020, eqs. 48, 49, 53, 56, 57, 61) with Dziugaite et al.'s σ search.

The network is measured as the function it computes in eval mode (BatchNorm folded, as for the norm measures). For
a noise scale σ, the weights are perturbed by δ ~ N(0, σ²) (all parameters of the folded network) — or, for the
magnitude-aware measures, by δ_i ~ N(0, σ²w_i² + ε²) with ε = 1e-3 — and the accuracy on the m measured training
images is averaged over Monte-Carlo draws. σ is found by bisection on [0, 2] (15 halvings, 10 draws each): the
largest σ whose mean accuracy drop from the unperturbed accuracy is 0.1 (within 0.01).

Dziugaite et al.'s code passes σ² where ``torch.normal`` takes a standard deviation (at σ = 0.3 its noise std is 0.09;
the magnitude-aware one: std σ²w² + ε²); ``convention="authors"`` reproduces that, ``"paper"`` (the default) draws
with the definition's variance. Every result records which one it used.

From σ (weights only, w₀ the initial weights, ω their number, m the images):

* ``pacbayes_init``: ‖w − w₀‖²/(4σ²) + log(m/σ) + 10;  ``pacbayes_orig``: ‖w‖²/(4σ²) + log(m/σ) + 10;
  ``pacbayes_flatness``: 1/σ²;
* from the magnitude-aware σ′: ``pacbayes_mag_init`` / ``pacbayes_mag_orig``: ¼ Σ_i log((ε² + (σ′² + 1)‖r‖²/ω) /
  (ε² + σ′²(w_i − w₀,i)²)) + log(m/σ′) + 10 with r = w − w₀ / w (the denominator is the distance to initialisation
  in both, as in their code); ``pacbayes_mag_flatness``: 1/σ′².

Reported like the norm measures, √(v/m) when adjusted. The Monte-Carlo draws of one σ are evaluated together
(``torch.func.vmap`` over the stacked perturbed parameters), from a generator seeded by the request's seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from minima.core import distributed
from minima.geometry.fold import fold_batchnorm

#: Every PAC-Bayes measure, in the order they are reported.
MEASURES = ("pacbayes_init", "pacbayes_orig", "pacbayes_flatness", "pacbayes_mag_init", "pacbayes_mag_orig",
            "pacbayes_mag_flatness")
#: The PAC-Bayes measures that need the initial weights (``--pacbayes-init``).
NEEDS_INIT = ("pacbayes_init", "pacbayes_mag_init", "pacbayes_mag_orig")
MAG_EPS = 1e-3


@dataclass(frozen=True)
class SigmaSearch:
    """The bisection's settings: halvings, Monte-Carlo draws per σ, the accuracy drop sought and its tolerance, the
    noise convention (``paper``: variance σ²; ``authors``: standard deviation σ²), magnitude-aware or not."""

    depth: int = 15
    draws: int = 10
    drop: float = 0.1
    tolerance: float = 0.01
    convention: str = "paper"
    magnitude: bool = False


def _noise_std(params: dict[str, torch.Tensor], sigma: float, s: SigmaSearch) -> dict[str, torch.Tensor]:
    if s.magnitude:
        variance = {k: sigma ** 2 * p.abs() ** 2 + MAG_EPS ** 2 for k, p in params.items()}
        return {k: v if s.convention == "authors" else v.sqrt() for k, v in variance.items()}
    std = sigma ** 2 if s.convention == "authors" else sigma
    return {k: torch.full_like(p, std) for k, p in params.items()}


def perturbed_accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], sigma: float,
                       s: SigmaSearch, generator: torch.Generator) -> float:
    """Mean over ``s.draws`` perturbations of the accuracy of eval-mode ``model`` on ``batches`` (all draws of a batch
    in one vmapped call)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    std = _noise_std(params, sigma, s)
    noisy = {k: p + std[k] * torch.randn((s.draws, *p.shape), generator=generator, dtype=p.dtype).to(p.device)
             for k, p in params.items()}

    def logits(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (theta, buffers), (x,))

    correct = torch.zeros(s.draws, dtype=torch.float64)
    total = 0
    with torch.no_grad():
        for x, y in batches:
            out = vmap(logits, in_dims=(0, None))(noisy, x)  # (draws, batch, classes)
            correct += (out.argmax(dim=-1) == y).sum(dim=1).to(torch.float64).cpu()
            total += len(y)
    counts = distributed.all_reduce_sum(torch.cat([correct, torch.tensor([float(total)], dtype=torch.float64)]))
    return float(counts[:-1].mean() / counts[-1])  # every rank's images: every rank takes the same bisection step


def accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             params: dict[str, torch.Tensor] | None = None) -> float:
    """The accuracy of ``model`` (with ``params`` in place of its parameters, when given) on ``batches`` (of every
    rank's)."""
    buffers = dict(model.named_buffers())

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(x) if params is None else functional_call(model, (params, buffers), (x,))

    with torch.no_grad():
        right = sum(int((logits(x).argmax(dim=-1) == y).sum()) for x, y in batches)
    counts = distributed.all_reduce_sum(torch.tensor([float(right), float(sum(len(y) for _, y in batches))],
                                                     dtype=torch.float64))
    return float(counts[0] / counts[1])


def search_sigma(accuracy_at: Callable[[float], float], base: float, s: SigmaSearch) -> float:
    """Dziugaite et al.'s bisection on [0, 2]: σ whose accuracy drop |accuracy_at(σ) − base| is ``s.drop`` within
    ``s.tolerance`` (the last midpoint when the halvings run out)."""
    lower, upper, sigma = 0.0, 2.0, 1.0
    for _ in range(s.depth):
        sigma = (lower + upper) / 2
        drop = abs(accuracy_at(sigma) - base)
        if abs(drop - s.drop) < s.tolerance:
            break
        if drop > s.drop:
            upper = sigma
        else:
            lower = sigma
    return sigma


def _weights(model: nn.Module) -> torch.Tensor:
    """The folded network's weights only (≥ 2-dimensional parameters), one float64 vector."""
    return torch.cat([p.detach().to(torch.float64).reshape(-1) for p in model.parameters() if p.dim() >= 2])


def measures(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], m: int, seed: int,
             init: nn.Module | None = None, search: SigmaSearch = SigmaSearch(), adjust: bool = True
             ) -> dict[str, float]:
    """Every measure of :data:`MEASURES` (those of :data:`NEEDS_INIT` only with ``init``) and the two σ found
    (``sigma``, ``sigma_mag``)."""
    folded = fold_batchnorm(model).eval()
    base = accuracy(folded, batches)
    generator = torch.Generator().manual_seed(seed)
    sigma = search_sigma(lambda v: perturbed_accuracy(folded, batches, v, search, generator), base, search)
    mag = SigmaSearch(search.depth, search.draws, search.drop, search.tolerance, search.convention, magnitude=True)
    sigma_mag = search_sigma(lambda v: perturbed_accuracy(folded, batches, v, mag, generator), base, mag)
    w = _weights(folded)
    out = {"pacbayes_orig": float(w.pow(2).sum()) / (4 * sigma ** 2) + math.log(m / sigma) + 10,
           "pacbayes_flatness": 1 / sigma ** 2, "pacbayes_mag_flatness": 1 / sigma_mag ** 2}
    if init is not None:
        w0 = _weights(fold_batchnorm(init).eval())
        if w0.shape != w.shape:
            raise ValueError("the initial weights are not of the same architecture as the measured network")
        dist = w - w0
        out["pacbayes_init"] = float(dist.pow(2).sum()) / (4 * sigma ** 2) + math.log(m / sigma) + 10

        def mag_bound(reference: torch.Tensor) -> float:
            numerator = MAG_EPS ** 2 + (sigma_mag ** 2 + 1) * float(reference.pow(2).sum()) / len(w)
            denominator = MAG_EPS ** 2 + sigma_mag ** 2 * dist.pow(2)
            return 0.25 * float(torch.log(numerator / denominator).sum()) + math.log(m / sigma_mag) + 10

        out["pacbayes_mag_init"], out["pacbayes_mag_orig"] = mag_bound(dist), mag_bound(w)
    if adjust:
        out = {k: math.sqrt(v / m) for k, v in out.items()}
    return {**out, "sigma": sigma, "sigma_mag": sigma_mag, "accuracy": base}
