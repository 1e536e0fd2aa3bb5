"""Adaptive worst-case sharpness as Andriushchenko, Croce, Müller, Hein, Flammarion (ICML 2023) measure it.

    S = mean over batches B of m images of [ max_{δ ∈ C} L_B(w + δ) − L_B(w) ]      (m-sharpness)

with C the adaptive ℓ∞ box |δ_i| ≤ ρ·s_i or the adaptive ℓ2 ellipsoid ‖δ ⊘ s‖₂ ≤ ρ, s = |w| (adaptive) or 1
(non-adaptive), every parameter perturbed, BatchNorm in eval mode with its running statistics fixed. The
maximisation is Auto-PGD (Croce & Hein 2020) as the authors run it: δ₀ = 0, ``iterations`` gradient evaluations,
initial step η = 2ρ, ascent steps s ⊙ sign(g) (ℓ∞) or along the gradient (ℓ2), momentum
x_{k+1} = P(x_k + α(z_{k+1} − x_k) + (1 − α)(x_k − x_{k−1})) with α = 0.75 and z_{k+1} = P(x_k + η·step), and at
the checkpoints p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (iteration ⌈p_j·N⌉) the step is
halved and the iterate restarted from the best point when fewer than 75 % of the steps since the last checkpoint
raised the loss, or when neither the step nor the best loss changed since; the best loss seen is reported.

**The ℓ2 step, and invariance.** Working in the scaled coordinates z = δ ⊘ s makes the ellipsoid a ball and the
measure invariant to rescalings that leave the network's function unchanged (multiply a ReLU layer's incoming
weights by c and its outgoing ones by 1/c): the ascent direction is s ⊙ u/‖u‖ with u = g ⊙ s (the gradient in z,
normalised there) and the projection rescales z onto the ball. The authors' code normalises g in the original
coordinates, g/‖g‖ ⊙ s, and projects δ in the Euclidean metric (bisection on the Lagrange multiplier); with that
step the measure changes under the rescaling (by 3 % on a tiny MLP in the issue's measurement). ``l2_step =
"invariant"`` (default) is ours, ``"authors"`` theirs for comparison; ℓ∞ is invariant either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ValueAndGrad = Callable[[torch.Tensor], tuple[float, torch.Tensor]]
MOMENTUM = 0.75


def checkpoints(iterations: int) -> list[int]:
    """The iterations at which Auto-PGD may halve its step: ⌈p_j·N⌉ for p₀ = 0, p₁ = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), below N."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * iterations) for q in p if math.ceil(q * iterations) < iterations})


def authors_checkpoints(iterations: int) -> list[int]:
    """The 0-based iterations after which the authors' loop may halve its step: their list ⌈p_j·N⌉ (p₁ = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), built until it reaches N or repeats, floating point as theirs),
    compared with the 0-based iteration index — one iteration later than :func:`checkpoints` (N = 20: 5, 9, 12, 15,
    16, 18, 19)."""
    p, w = [0.0, 0.22], [0, math.ceil(iterations * 0.22)]
    while w[-1] < iterations and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * iterations))
    return w[1:]


def project_linf(delta: torch.Tensor, s: torch.Tensor, rho: float) -> torch.Tensor:
    """Onto the box |δ_i| ≤ ρ·s_i."""
    return torch.maximum(torch.minimum(delta, rho * s), -rho * s)


def project_l2_scaled(delta: torch.Tensor, s: torch.Tensor, rho: float) -> torch.Tensor:
    """Onto the ellipsoid ‖δ ⊘ s‖₂ ≤ ρ in the scaled metric (the ball in z = δ ⊘ s): z ← z·min(1, ρ/‖z‖);
    coordinates with s_i = 0 are fixed at 0."""
    z = torch.where(s > 0, delta / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(delta))
    norm = float(z.norm())
    return z * s * (min(1.0, rho / norm) if norm > 0 else 1.0)


def project_l2_euclidean(delta: torch.Tensor, s: torch.Tensor, rho: float, tol: float = 1e-12,
                         max_iter: int = 200) -> torch.Tensor:
    """The Euclidean projection onto the ellipsoid Σ (δ_i/s_i)² ≤ ρ² (the authors' choice): δ'_i = δ_i·s_i²/(s_i² + λ)
    with λ ≥ 0 found by bisection so that the constraint is active (λ = 0 inside)."""
    s2 = s * s

    def excess(lam: float) -> float:
        z = delta * s / (s2 + lam)  # δ'_i / s_i without dividing by zero
        return float((z * z).sum()) - rho * rho

    if excess(0.0) <= 0 and bool((s > 0).all()):
        return delta.clone()
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        hi *= 2.0
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= tol * max(hi, 1e-300):
            break
    return delta * s2 / (s2 + hi)


def project_l2_bisection(delta: torch.Tensor, s: torch.Tensor, rho: float) -> torch.Tensor:
    """The authors' approximate projection onto the ellipsoid ‖δ ⊘ s‖₂ ≤ ρ: δ/(1 + 2λ/s²) with λ found by their
    bisection — λ from 0.1 in [0, 10], the upper limit doubled when approached, until the scaled norm is within 10⁻⁵
    of ρ (so it may end slightly outside). Used by :func:`authors_loop` with the authors' ℓ2 step, where their
    numbers are the reference; :func:`project_l2_euclidean` is the exact projection."""

    def scaled_norm(d: torch.Tensor) -> float:
        return float(((d / s) ** 2).sum()) ** 0.5

    new = scaled_norm(delta)
    if new <= rho:
        return delta
    lam, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
    out = delta
    while abs(new - rho) > 1e-5:
        out = delta / (1 + 2 * lam / s ** 2)
        new = scaled_norm(out)
        if new > rho:
            lam, lo = (lam + hi) / 2, lam
        else:
            lam, hi = (lo + lam) / 2, lam
        if limit - hi < 1e-2:
            limit, hi = 2 * limit, 2 * hi
    return out


Move = Callable[[torch.Tensor], torch.Tensor]


def _moves(w: torch.Tensor, rho: float, norm: str, adaptive: bool, l2_step: str, authors: bool) -> tuple[Move, Move]:
    """(projection onto the set, ascent direction from a gradient) of both loops, with s = |w| or 1. ℓ∞: the box
    and s ⊙ sign(g). ℓ2 ``invariant``: the scaled ball and s ⊙ u/‖u‖, u = g ⊙ s. ℓ2 ``authors``: g/‖g‖ ⊙ s with the
    Euclidean projection — in the authors' loop (``authors``) their g/(‖g‖ + 10⁻¹²) and, on the adaptive ellipsoid,
    their bisection."""
    s = w.abs() if adaptive else torch.ones_like(w)

    def project(d: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return project_linf(d, s, rho)
        if l2_step == "invariant":
            return project_l2_scaled(d, s, rho)
        return project_l2_bisection(d, s, rho) if authors and adaptive else project_l2_euclidean(d, s, rho)

    def step(g: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return s * torch.sign(g)
        if l2_step == "invariant":
            u = g * s
            return s * u / max(float(u.norm()), 1e-300)
        return g / ((float(g.norm()) + 1e-12) if authors else max(float(g.norm()), 1e-300)) * s

    return project, step


@dataclass(frozen=True)
class AscentResult:
    """One maximisation: the loss at w, the best loss found, the gradient evaluations used."""

    f0: float
    f_best: float
    evaluations: int


def apgd(value_and_grad: ValueAndGrad, w: torch.Tensor, rho: float, *, norm: str = "linf", adaptive: bool = True,
         iterations: int = 20, l2_step: str = "invariant", loop: str = "apgd") -> AscentResult:
    """Auto-PGD maximisation of f(w + δ) over the adaptive (or plain) ℓ∞ box or ℓ2 ellipsoid of radius ``rho``
    (see the module docstring); ``iterations`` gradient evaluations after the one at w. ``loop="authors"``: the
    iteration of the authors' code instead (:func:`authors_loop`)."""
    if rho <= 0 or iterations < 1:
        raise ValueError(f"need rho > 0 and ≥ 1 iteration; got rho={rho}, iterations={iterations}")
    if norm not in ("linf", "l2") or l2_step not in ("invariant", "authors"):
        raise ValueError(f"unknown norm {norm!r} or l2 step {l2_step!r}")
    if loop not in ("apgd", "authors"):
        raise ValueError(f"unknown worst-case loop {loop!r}; choose 'authors' or 'apgd'")
    if loop == "authors":
        return authors_loop(value_and_grad, w, rho, norm=norm, adaptive=adaptive, iterations=iterations,
                            l2_step=l2_step)
    w = w.to(torch.float64)
    project, step = _moves(w, rho, norm, adaptive, l2_step, authors=False)
    f0, g = value_and_grad(w)
    eta = 2.0 * rho
    x_prev = x = torch.zeros_like(w)
    f_x, best, x_best, g_best = f0, f0, x, g
    marks = set(checkpoints(iterations))
    last_mark, eta_at_mark, best_at_mark, improved = 0, eta, best, 0
    for k in range(iterations):
        z = project(x + eta * step(g))
        x_new = z if k == 0 else project(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev))
        f_new, g_new = value_and_grad(w + x_new)
        improved += int(f_new > f_x)
        x_prev, x, f_x, g = x, x_new, f_new, g_new
        if f_new > best:
            best, x_best, g_best = f_new, x_new, g_new
        if k + 1 in marks:
            span = k + 1 - last_mark
            if improved < 0.75 * span or (eta_at_mark == eta and best_at_mark == best):
                eta /= 2.0
                x_prev = x = x_best
                f_x, g = best, g_best
            last_mark, eta_at_mark, best_at_mark, improved = k + 1, eta, best, 0
    return AscentResult(f0=float(f0), f_best=float(best), evaluations=iterations + 1)


def authors_loop(value_and_grad: ValueAndGrad, w: torch.Tensor, rho: float, *, norm: str = "linf",
                 adaptive: bool = True, iterations: int = 20, l2_step: str = "authors") -> AscentResult:
    """The maximisation exactly as tml-epfl/sharpness-vs-generalization's ``eval_APGD_sharpness`` iterates (zero
    start, one restart), where it differs from the Auto-PGD paper in four places: the momentum step is
    x_{k+1} = 0.75·z_{k+1} + 0.25·x_{k−1} with z_{k+1} = P(x_k + η·step) and no second projection (x₁ = 0.75·z₁);
    the step-size checks run after the 0-based iterations of :func:`authors_checkpoints`; condition 1 counts the
    iterations that raised the *best* loss; and the halving moves the point where the next gradient is taken to the
    best one while δ and the previous δ are kept (their ``model.load_state_dict(worst_model_dict)``). The ℓ2 step is
    η·g/(‖g‖ + 10⁻¹²) ⊙ s with their projection (``l2_step="authors"``: the sphere, or on the adaptive ellipsoid
    their bisection, :func:`project_l2_bisection`) or ours."""
    w = w.to(torch.float64)
    project, step = _moves(w, rho, norm, adaptive, l2_step, authors=True)
    f0, g = value_and_grad(w)
    delta = prev = torch.zeros_like(w)
    best, best_g = f0, g
    eta = prev_eta = 2.0 * rho
    prev_best, prev_mark, updates = f0, 0, 0
    marks = set(authors_checkpoints(iterations))
    for i in range(iterations):
        backup = delta
        delta = MOMENTUM * project(delta + eta * step(g)) + (1 - MOMENTUM) * prev
        prev = backup
        f, g = value_and_grad(w + delta)
        if f > best:
            best, best_g = f, g
            updates += 1
        if i in marks:
            cond1 = updates < 0.75 * (i - prev_mark)
            cond2 = prev_eta == eta and prev_best == best
            prev_eta, prev_best, prev_mark, updates = eta, best, i, 0
            if cond1 or cond2:
                eta *= 0.5
                g = best_g  # the next gradient is taken at the best point; δ and the previous δ stay
    return AscentResult(f0=float(f0), f_best=float(best), evaluations=iterations + 1)


def iteration_seconds(w: torch.Tensor, rho: float, *, norm: str = "linf", adaptive: bool = True,
                      l2_step: str = "invariant", iterations: int = 4) -> float:
    """Seconds of one Auto-PGD iteration's own vector work on a vector like ``w`` (a loss that costs nothing and
    a fixed gradient), for estimates: with millions of parameters it is not small next to a gradient of m images."""
    g = torch.ones_like(w, dtype=torch.float64)
    t0 = time.perf_counter()
    apgd(lambda x: (float(x[0]), g), w, rho, norm=norm, adaptive=adaptive, iterations=iterations, l2_step=l2_step)
    return (time.perf_counter() - t0) / iterations


@dataclass(frozen=True)
class WorstCaseResult:
    """m-sharpness: the mean over ``batches`` batches of m images of the best loss increase, with its standard
    error over batches."""

    sharpness: float
    stderr: float
    batches: int
    m: int
    n: int
    rho: float
    norm: str
    adaptive: bool
    l2_step: str
    iterations: int
    loop: str
    f0_mean: float
    f_max_mean: float
    seconds: float


def worst_case_sharpness(batch_objectives: list[ValueAndGrad], w: torch.Tensor, rho: float, *, m: int, n: int,
                         norm: str = "linf", adaptive: bool = True, iterations: int = 20,
                         l2_step: str = "invariant", reduce: Callable[[np.ndarray], np.ndarray] | None = None,
                         loop: str = "apgd") -> WorstCaseResult:
    """:func:`apgd` on every batch's loss (``batch_objectives``: one value_and_grad per batch of m images) and the
    mean increase; ``reduce`` sums a vector over ranks (each rank holds its own batches; None: one process)."""
    t0 = time.perf_counter()
    rows = np.array([[r.f_best - r.f0, (r.f_best - r.f0) ** 2, r.f0, r.f_best, 1.0]
                     for r in (apgd(vg, w, rho, norm=norm, adaptive=adaptive, iterations=iterations, l2_step=l2_step,
                                    loop=loop) for vg in batch_objectives)]).reshape(-1, 5)
    total = rows.sum(axis=0)
    if reduce is not None:
        total = reduce(total)
    count = total[4]
    mean = total[0] / count
    var = max(total[1] / count - mean * mean, 0.0) * count / max(count - 1, 1)
    return WorstCaseResult(sharpness=float(mean), stderr=float(math.sqrt(var / count)), batches=int(count), m=m, n=n,
                           rho=rho, norm=norm, adaptive=adaptive, l2_step=l2_step, iterations=iterations, loop=loop,
                           f0_mean=float(total[2] / count), f_max_mean=float(total[3] / count),
                           seconds=time.perf_counter() - t0)
