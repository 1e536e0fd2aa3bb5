"""Sharpness measures: Keskar's ε-sharpness (full space and a random subspace), adaptive worst-case
ρ-sharpness, and average-case (Gaussian) sharpness.

All functions take ``value_and_grad(θ) -> (f, ∇f)`` on float64 torch vectors and the point ``x``, so they work
on any objective (a :class:`minima.curvature.objective.DatasetObjective`, or an analytic function in tests).

**Keskar et al. (2017), Metric 2.1.** For A ∈ R^{n×p} (A = I_n for the full space) and the box
C_ε = {z ∈ R^p : |z_i| ≤ ε(|(A⁺x)_i| + 1)},

    φ_{x,f}(ε, A) = 100 · (max_{y ∈ C_ε} f(x + A y) − f(x)) / (1 + f(x)),

with the maximisation done inexactly by scipy's L-BFGS-B (``maxiter`` iterations, 10 in the paper) on −f,
starting from y = 0. φ is a percentage; it is ≥ 0 because y = 0 is feasible.

**Adaptive worst-case ρ-sharpness** (Kwon et al. 2021; Andriushchenko et al. 2023, L∞):
max_{|δ_i| ≤ ρ|w_i|} f(w + δ) − f(w), by projected sign-gradient ascent. Because the box scales with |w|, it
is invariant to the ReLU rescalings of Dinh et al. (2017) that change Keskar's φ and λ_max arbitrarily.

**Average-case sharpness**: E_δ[f(w + δ)] − f(w) with δ_i ~ N(0, (σ|w_i|)²), a Monte-Carlo mean with its
standard error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from minima.curvature.lbfgsb import minimize_box

ValueAndGrad = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


# ------------------------------------------------------------------------------------------- subspaces
class RandomSubspace:
    """A ∈ R^{n×p} with i.i.d. N(0, 1) entries; column j is generated from ``(seed, j)``.

    The float32 matrix is kept in memory when it fits in ``max_cache_bytes`` (C1 with p = 100: 0.7 GB);
    otherwise each column is regenerated whenever needed, so a 100-dimensional subspace of a 15M-parameter
    network costs no memory. Products are accumulated in float64, ``block`` columns at a time, on ``device`` (the
    columns are drawn on the host from their seeds — the same matrix on every device — and kept on the device)."""

    def __init__(self, n: int, p: int, seed: int = 0, block: int = 10, max_cache_bytes: int = 2**31,
                 device: torch.device | str = "cpu") -> None:
        if not 1 <= p <= n:
            raise ValueError(f"subspace dimension p must be in 1..{n}; got {p}")
        self.n, self.p, self.seed, self.block, self.device = n, p, seed, block, torch.device(device)
        self._cache = self._generate(0, p) if n * p * 4 <= max_cache_bytes else None

    def _generate(self, start: int, stop: int) -> torch.Tensor:
        cols = []
        for j in range(start, stop):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            cols.append(torch.randn(self.n, generator=gen, dtype=torch.float32))
        return torch.stack(cols, dim=1).to(self.device)

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` as an (n, stop − start) float64 tensor."""
        block = self._cache[:, start:stop] if self._cache is not None else self._generate(start, stop)
        return block.to(torch.float64)

    def _blocks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.block, self.p)) for s in range(0, self.p, self.block)]

    def matvec(self, y: torch.Tensor) -> torch.Tensor:
        """A·y ∈ R^n."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        y = y.to(self.device)
        for s, e in self._blocks():
            out += self.columns(s, e) @ y[s:e]
        return out

    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """Aᵀ·g ∈ R^p."""
        return torch.cat([self.columns(s, e).T @ g for s, e in self._blocks()])

    def gram(self) -> torch.Tensor:
        """AᵀA ∈ R^{p×p}."""
        blocks = self._blocks()
        out = torch.zeros(self.p, self.p, dtype=torch.float64, device=self.device)
        for i, (s, e) in enumerate(blocks):
            ai = self.columns(s, e)
            for s2, e2 in blocks[i:]:
                aj = ai if s2 == s else self.columns(s2, e2)
                block = ai.T @ aj
                out[s:e, s2:e2] = block
                out[s2:e2, s:e] = block.T
        return out

    def pinv_apply(self, x: torch.Tensor) -> torch.Tensor:
        """A⁺x = (AᵀA)⁻¹Aᵀx for full column rank A (Cholesky of the p×p Gram matrix; no n×n matrix)."""
        chol = torch.linalg.cholesky(self.gram())
        return torch.cholesky_solve(self.rmatvec(x)[:, None], chol)[:, 0]


class DenseSubspace(RandomSubspace):
    """An explicit n×p matrix (tests, or a user-chosen basis)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        super().__init__(matrix.shape[0], matrix.shape[1], seed=0, block=matrix.shape[1], max_cache_bytes=0,
                         device=matrix.device)
        self.matrix = matrix

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of the subspace basis A (n × p), as a view."""
        return self.matrix[:, start:stop]


# ---------------------------------------------------------------------------------------- Keskar
@dataclass(frozen=True)
class KeskarResult:
    """φ (percent), f(x), the maximised f(x + A y), and how L-BFGS-B ran."""

    phi: float
    f0: float
    f_max: float
    eps: float
    p: int | None  # None for the full space
    seed: int | None
    function_evals: int
    iterations: int
    hit_iteration_limit: bool
    message: str
    seconds: float


def keskar_sharpness(
    value_and_grad: ValueAndGrad, x: torch.Tensor, eps: float, *, subspace: RandomSubspace | None = None,
    maxiter: int = 10, f0: float | None = None,
) -> KeskarResult:
    """Keskar's φ_{x,f}(ε, A): A = I (full space) if ``subspace`` is None, else the given A.

    ``x`` and the gradients stay on their device; L-BFGS-B (scipy) sees host copies of the n- or p-vectors it
    steers — one copy each way per function evaluation, the adapter's whole cost."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    t0 = time.perf_counter()
    x = x.to(torch.float64)
    if f0 is None:
        f0 = float(value_and_grad(x)[0])
    if subspace is None:
        half_width = eps * (x.abs() + 1.0)

        def to_point(y: np.ndarray) -> torch.Tensor:
            return x + torch.from_numpy(y).to(x.device)

        def pull_back(g: torch.Tensor) -> torch.Tensor:
            return g
    else:
        half_width = eps * (subspace.pinv_apply(x).abs() + 1.0)

        def to_point(y: np.ndarray) -> torch.Tensor:
            return x + subspace.matvec(torch.from_numpy(y))

        def pull_back(g: torch.Tensor) -> torch.Tensor:
            return subspace.rmatvec(g)

    best = {"f": f0}

    def negative(y: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = value_and_grad(to_point(y))
        best["f"] = max(best["f"], float(f))
        return -float(f), -pull_back(g).cpu().numpy()

    hw = half_width.cpu().numpy()
    # scipy's L-BFGS-B routine driven without scipy's per-variable Python loops (minima.curvature.lbfgsb): the same
    # iterates as minimize(method="L-BFGS-B"), in a fraction of the time for millions of parameters
    res = minimize_box(negative, np.zeros_like(hw), -hw, hw, maxiter=maxiter)
    # The best value seen (L-BFGS-B's final iterate is normally it; line searches can overshoot).
    f_max = max(best["f"], -float(res.fun))
    return KeskarResult(
        phi=100.0 * (f_max - f0) / (1.0 + f0), f0=f0, f_max=f_max, eps=eps,
        p=None if subspace is None else subspace.p, seed=None if subspace is None else subspace.seed,
        function_evals=int(res.nfev), iterations=int(res.nit), hit_iteration_limit=int(res.nit) >= maxiter,
        message=str(res.message), seconds=time.perf_counter() - t0,
    )


def keskar_overheads(n: int, device: torch.device | str = "cpu", probe: int = 200_000) -> dict[str, float]:
    """Seconds of Keskar's machinery besides the objective, for an estimate before a measurement: ``lbfgsb`` —
    scipy's L-BFGS-B set-up and steps on n boxed variables (linear in n, about as long as the few iterations of a
    Keskar run; timed on ``probe`` variables and scaled), per run; and, timed on four columns of the real length n
    (the work is memory-bound, so a short probe would flatter it): ``subspace_columns`` — drawing one
    column of a random subspace, per column; ``subspace_products`` — one n-long dot product of float64 columns (the
    Gram matrix takes p²/2 of them); ``subspace_passes`` — one column's share of an A·y and an Aᵀ·g (each function
    evaluation in the subspace makes one of each, reading every column again)."""
    probe = min(probe, n)
    hw = np.full(probe, 1e-3)
    t0 = time.perf_counter()
    minimize_box(lambda y: (0.5 * float(y @ y), y), np.zeros(probe), -hw, hw, maxiter=2)
    lbfgsb = (time.perf_counter() - t0) * n / probe
    width = 4
    t0 = time.perf_counter()
    sub = RandomSubspace(n, width, seed=0, block=width, device=device)
    columns = (time.perf_counter() - t0) / width
    t0 = time.perf_counter()
    sub.gram()
    products = (time.perf_counter() - t0) / (width * width)
    t0 = time.perf_counter()
    sub.rmatvec(sub.matvec(torch.ones(width, dtype=torch.float64)))
    passes = (time.perf_counter() - t0) / width
    return {"lbfgsb": lbfgsb, "subspace_columns": columns, "subspace_products": products, "subspace_passes": passes}


# -------------------------------------------------------------------------- adaptive / average-case
@dataclass(frozen=True)
class AdaptiveResult:
    """max f(w + δ) − f(w) over |δ_i| ≤ ρ|w_i| found by ``steps`` projected sign-gradient steps."""

    sharpness: float
    f0: float
    f_max: float
    rho: float
    steps: int
    seconds: float


def adaptive_sharpness(
    value_and_grad: ValueAndGrad, w: torch.Tensor, rho: float, *, steps: int = 10, step_size: float | None = None,
) -> AdaptiveResult:
    """Adaptive worst-case L∞ ρ-sharpness by projected gradient ascent from δ = 0.

    Each step moves δ by ``step_size·ρ|w|·sign(∇f)`` (default step size 2/steps of the box half-width) and
    clips back into the box; the largest loss seen is reported.
    """
    if rho <= 0 or steps < 1:
        raise ValueError(f"need rho > 0 and steps ≥ 1; got rho={rho}, steps={steps}")
    t0 = time.perf_counter()
    w = w.to(torch.float64)
    bound = rho * w.abs()
    eta = (2.0 / steps) if step_size is None else step_size
    delta = torch.zeros_like(w)
    f0, g = value_and_grad(w)
    f_max = f0
    for _ in range(steps):
        delta = torch.clamp(delta + eta * bound * torch.sign(g), -bound, bound)
        f, g = value_and_grad(w + delta)
        f_max = max(f_max, float(f))
    return AdaptiveResult(sharpness=f_max - f0, f0=f0, f_max=f_max, rho=rho, steps=steps,
                          seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class AverageResult:
    """Mean loss increase under δ_i ~ N(0, (σ|w_i|)²) over ``samples`` draws, with its standard error."""

    sharpness: float
    stderr: float
    f0: float
    sigma: float
    samples: int
    seed: int
    seconds: float


def average_sharpness(
    value: Callable[[torch.Tensor], float], w: torch.Tensor, sigma: float, *, samples: int = 10, seed: int = 0,
) -> AverageResult:
    """E[f(w + δ)] − f(w) for multiplicative Gaussian noise of relative scale σ."""
    if sigma <= 0 or samples < 2:
        raise ValueError(f"need sigma > 0 and samples ≥ 2; got sigma={sigma}, samples={samples}")
    t0 = time.perf_counter()
    w = w.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    f0 = float(value(w))
    # noise drawn on the host (the same on every device), applied on w's device
    increases = np.array([float(value(w + sigma * w.abs() * torch.randn(w.shape, generator=gen,
                                                                          dtype=torch.float64).to(w.device))) - f0
                          for _ in range(samples)])
    return AverageResult(sharpness=float(increases.mean()), stderr=float(increases.std(ddof=1) / np.sqrt(samples)),
                         f0=f0, sigma=sigma, samples=samples, seed=seed, seconds=time.perf_counter() - t0)

