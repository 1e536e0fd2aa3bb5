"""Hessian of the training loss: a scipy ``LinearOperator``, top-k eigenvalues with error bounds, and
Hutchinson's trace estimate.

* **Eigenvalues** (the algebraically largest) come from Lanczos. Each returned Ritz pair (λ̂, x̂), ‖x̂‖ = 1,
  carries the residual r = ‖H x̂ − λ̂ x̂‖. For a symmetric H some eigenvalue λ satisfies |λ − λ̂| ≤ r, so
  ``r / |λ̂|`` bounds the relative error (when the pair is the one sought — Lanczos finds extreme eigenvalues
  first). Two methods:

  - ``"lanczos"`` (default): plain Lanczos with full reorthogonalisation, no restarts, checking after every
    product whether all k Ritz values meet ``r ≤ tol·|λ̂|``, with r read off the Lanczos relation
    H Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ (r_i = β_m·|s_{m,i}|, exact up to rounding when the basis is kept
    orthogonal) — so it stops at the first product that suffices and the bounds cost nothing. It stores the
    basis: ``max_steps`` vectors of n float64 (C1: 14 MB each).
  - ``"arpack"``: ``scipy.sparse.linalg.eigsh`` (implicitly restarted, ``ncv`` vectors), for models whose basis
    would not fit in memory; its residuals are computed with one extra product per eigenvalue.

  ``docs/benchmarks.md`` compares their product counts on a trained C1.
* **Trace**: tr(H) = E[zᵀHz] for Rademacher z; the mean over probes with its standard error
  s/√m, stopping once the standard error is below ``rtol·|mean|`` (after ``min_probes``) or at ``max_probes``.
  Hutch++ (Meyer, Musco, Musco, Woodruff 2021) spends a third of its products on a sketch Q of the top of the
  spectrum, takes tr(QᵀHQ) exactly and estimates the rest with Hutchinson on (I − QQᵀ)H(I − QQᵀ): far smaller
  error when a few eigenvalues dominate, as in trained networks.
* **Spectral density** (Ghorbani et al. 2019; PyHessian): stochastic Lanczos quadrature. Per Rademacher probe q,
  m Lanczos steps give T_m = S Θ Sᵀ; the density is Σ_j τ_j δ(λ − θ_j) with weights τ_j = (S_{1j})² — the
  squared *first components* of T_m's eigenvectors (PyHessian used the eigenvalues' squares until 2024) —
  averaged over probes. Σ τ_j θ_j^k = qᵀH^kq/n exactly for k ≤ 2m − 1, so the moments are Hutchinson estimates of
  tr(H^k)/n.
* **Blocks**: :func:`block_operator` restricts an operator to a set of coordinates — the diagonal block H_BB of one
  layer or module — so every method above measures a block.

HVP counts are reported with every result: HVPs are what curvature estimation costs.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator, eigsh

from minima.core.vocab import EigenMethod


class CountingOperator(LinearOperator):
    """A symmetric n×n matrix given by ``matvec`` (float64 torch vectors on ``device``), counting products.

    :meth:`apply` is the torch interface the Lanczos and Hutchinson code here use: vectors stay on the device.
    As a scipy ``LinearOperator`` (ARPACK) every product copies its vector to the device and back — the adapter."""

    def __init__(self, n: int, matvec: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu") -> None:
        super().__init__(dtype=np.float64, shape=(n, n))
        self._hv = matvec
        self.device = torch.device(device)
        self.products = 0

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """H·v for a float64 vector on the operator's ``device`` (returned there)."""
        self.products += 1
        return self._hv(v)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(self.device)
        return self.apply(v).cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # symmetric
        return self._matvec(x)


def hessian_operator(objective: object) -> CountingOperator:
    """The Hessian of a :class:`minima.curvature.objective.DatasetObjective` at its current parameters (vectors on the
    objective's device)."""
    return CountingOperator(objective.numel, objective.hvp, objective.vector_device)  # type: ignore[attr-defined]


def ggn_operator(objective: object) -> CountingOperator:
    """The generalised Gauss–Newton matrix of a :class:`minima.curvature.objective.DatasetObjective` (``ggn_vp``)."""
    return CountingOperator(objective.numel, objective.ggn_vp, objective.vector_device)  # type: ignore[attr-defined]


def fisher_operator(objective: object, kind: str = "empirical", seed: int = 0) -> CountingOperator:
    """The empirical (``kind="empirical"``) or Monte-Carlo (``"mc"``, labels drawn from the model with ``seed``)
    Fisher matrix of a :class:`minima.curvature.objective.DatasetObjective` (``fisher_vp``)."""
    return CountingOperator(objective.numel,  # type: ignore[attr-defined]
                            lambda v: objective.fisher_vp(v, kind, seed),  # type: ignore[attr-defined]
                            objective.vector_device)  # type: ignore[attr-defined]


WARM_NOISE = 0.1  # share of the seeded random draw in a warm-started Lanczos start vector


def _start_vector(rng: np.random.Generator, n: int, device: torch.device, kind: str) -> torch.Tensor:
    """A seeded start or probe vector drawn on the host (the same numbers on every device), then moved."""
    draw = rng.standard_normal(n) if kind == "gaussian" else rng.integers(0, 2, n).astype(np.float64) * 2.0 - 1.0
    return torch.from_numpy(draw).to(device)


@dataclass(frozen=True)
class EigenResult:
    """Top eigenvalues (descending) with residual-based absolute error bounds and costs."""

    eigenvalues: np.ndarray
    residuals: np.ndarray
    hvps: int
    seconds: float
    tol: float
    ncv: int
    method: str = "lanczos"
    converged: bool = True
    eigenvectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def relative_error_bounds(self) -> np.ndarray:
        """Each eigenvalue's residual bound relative to its magnitude, ``r / |λ̂|``."""
        return self.residuals / np.maximum(np.abs(self.eigenvalues), 1e-300)


EIGEN_METHODS: tuple[str, ...] = typing.get_args(EigenMethod)


def top_eigenvalues(
    op: CountingOperator, k: int = 1, *, tol: float = 1e-3, method: str = "lanczos", max_steps: int | None = None,
    ncv: int | None = None, seed: int = 0, maxiter: int | None = None, return_vectors: bool = False,
    warm_start: torch.Tensor | None = None, which: str = "largest",
) -> EigenResult:
    """The ``k`` algebraically largest eigenvalues of the symmetric operator, each with a residual ``r`` such
    that some eigenvalue lies within ``r`` of it; stops once ``r ≤ tol·|λ̂|`` for all k (see the module notes).

    ``which="smallest"``: the ``k`` algebraically smallest instead (ascending; negative ones included — the
    directions of negative curvature at a saddle). Near zero a relative bound can never be met, so these stop once
    ``r ≤ tol·max(|λ̂|, ρ)`` with ρ the largest |Ritz value| so far (an estimate of the spectral radius): the
    absolute error of a small eigenvalue is then bounded by ``tol`` times the scale of the spectrum.

    ``warm_start`` (e.g. the top Ritz vector of a nearby operator): the start vector is
    w/‖w‖ + WARM_NOISE·g/‖g‖ with g the seeded Gaussian draw, so that the Krylov space still reaches the other
    top eigenvectors and never stalls on an exact eigenvector; the answer's tolerance is the same either way.

    ``method="lanczos"``: at most ``max_steps`` products (default ``max(4k + 20, 40)``, capped at n); if that is
    not enough, the result has ``converged=False`` and its (larger) residuals. ``method="arpack"``: ARPACK with
    a basis of ``ncv`` vectors (default ``max(2k + 1, k + 8)``) and ``maxiter`` restarts.
    """
    n = op.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for an operator of size {n}; got {k}")
    if method not in EIGEN_METHODS:
        raise ValueError(f"unknown eigenvalue method {method!r}; choose one of {list(EIGEN_METHODS)}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0; got {tol}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest'; got {which!r}")
    rng = np.random.default_rng(seed)
    start, t0 = op.products, time.perf_counter()
    v0 = _start_vector(rng, n, op.device, "gaussian")
    if warm_start is not None:
        if warm_start.numel() != n:
            raise ValueError(f"the warm start has {warm_start.numel()} entries; the operator has size {n}")
        warm = warm_start.to(op.device, torch.float64).reshape(-1)
        v0 = warm / torch.linalg.vector_norm(warm) + WARM_NOISE * v0 / torch.linalg.vector_norm(v0)
    if method == "lanczos":
        steps = min(n, max_steps if max_steps is not None else max(4 * k + 20, 40))
        if steps < k:
            raise ValueError(f"max_steps={steps} is smaller than k={k}")
        vals, residuals, vecs, used, converged = _lanczos(op, k, tol, steps, v0, return_vectors, which)
    else:
        used = min(n, ncv if ncv is not None else max(2 * k + 1, k + 8))
        # the same start vector as Lanczos'
        vals, vecs = eigsh(op, k=k, which="LA" if which == "largest" else "SA", tol=tol, ncv=used,
                           v0=v0.cpu().numpy(), maxiter=maxiter)
        order = np.argsort(vals)[::-1] if which == "largest" else np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
        residuals = np.empty(k)
        for j in range(k):
            x = vecs[:, j] / np.linalg.norm(vecs[:, j])
            residuals[j] = np.linalg.norm(op.matvec(x) - vals[j] * x)
        scale = np.abs(vals) if which == "largest" else np.maximum(np.abs(vals), np.abs(vals).max())
        converged = bool(np.all(residuals <= tol * scale))
    return EigenResult(eigenvalues=vals, residuals=residuals, hvps=op.products - start,
                       seconds=time.perf_counter() - t0, tol=tol, ncv=used, method=method, converged=converged,
                       eigenvectors=vecs if return_vectors else None)


def _lanczos_steps(
    op: CountingOperator, v0: torch.Tensor, steps: int,
) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, float]]:
    """Lanczos with full reorthogonalisation from ``v0``, on the operator's device. After each step m (one
    product) yields the basis Q_m (m × n, a device tensor), the diagonal α_1..α_m and off-diagonal β_1..β_{m−1} of
    T_m (host arrays: T is tiny), and β_m; stops after ``steps`` or when β_m = 0 (the Krylov space is invariant)."""
    basis = torch.empty((steps, op.shape[0]), dtype=torch.float64, device=op.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = op.apply(basis[j])
        alphas.append(float(w @ basis[j]))
        # Gram-Schmidt against the whole basis, twice ("twice is enough"): keeps Q orthogonal to rounding, so
        # no ghost copies of converged eigenvalues appear and the residual formula stays exact.
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        yield basis[: j + 1], np.array(alphas), np.array(betas), beta
        if beta == 0.0 or j == steps - 1:
            return
        betas.append(beta)
        basis[j + 1] = w / beta


def _ritz(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric tridiagonal T_m (diagonal α, off-diagonal β)."""
    return eigh_tridiagonal(alphas, betas) if len(betas) else (alphas, np.ones((1, 1)))


def _lanczos(
    op: CountingOperator, k: int, tol: float, steps: int, v0: torch.Tensor, return_vectors: bool,
    which: str = "largest",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, bool]:
    """The k Ritz values at ``which`` end (largest first, or smallest first), their residuals β_m·|s_{m,i}|, Ritz
    vectors, basis size and whether converged."""
    for step in _lanczos_steps(op, v0, steps):
        basis, alphas, betas, beta = step
        theta, s = _ritz(alphas, betas)
        top = (np.argsort(theta)[::-1] if which == "largest" else np.argsort(theta))[:k]
        residuals = beta * np.abs(s[-1, top])
        radius = float(np.abs(theta).max())
        scale = np.abs(theta[top]) if which == "largest" else np.maximum(np.abs(theta[top]), radius)
        # β ≈ 0: the Krylov space is invariant, its Ritz values are eigenvalues.
        exhausted = beta <= 1e-12 * max(radius, 1e-300)
        converged = (len(top) == k and bool(np.all(residuals <= tol * scale))) or exhausted
        if converged:
            break
    used = len(theta)
    if len(top) < k:
        raise ValueError(f"the Krylov space has dimension {used} < k={k}; the operator has fewer distinct "
                         "eigenvalues than asked for (use a smaller k)")
    vecs = (basis.T @ torch.from_numpy(np.ascontiguousarray(s[:, top])).to(basis.device)).cpu().numpy() \
        if return_vectors else None
    return theta[top], residuals, vecs, used, converged


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of tr(H) with its standard error over ``probes`` Rademacher vectors."""

    trace: float
    stderr: float
    probes: int
    hvps: int
    seconds: float
    converged: bool


def hutchinson_trace(
    op: CountingOperator, *, rtol: float = 1e-2, min_probes: int = 10, max_probes: int = 200, seed: int = 0,
) -> TraceResult:
    """tr(H) ≈ mean of zᵀHz over Rademacher z, stopping at standard error ≤ ``rtol·|mean|``."""
    return _hutchinson_mean(op, lambda z, hz: float(z @ hz), rtol, min_probes, max_probes, seed)


def squared_frobenius(
    op: CountingOperator, *, rtol: float = 1e-2, min_probes: int = 10, max_probes: int = 200, seed: int = 0,
) -> TraceResult:
    """tr(H²) = ‖H‖_F² = Σ λ_i² ≈ mean of ‖Hz‖² over Rademacher z (E[zᵀH²z] = tr(H²), one product per probe),
    stopping at standard error ≤ ``rtol·mean``; the result's ``trace`` field holds the estimate. Unlike tr(H), it
    cannot cancel: negative curvature counts as much as positive."""
    return _hutchinson_mean(op, lambda z, hz: float(hz @ hz), rtol, min_probes, max_probes, seed)


def _hutchinson_mean(op: CountingOperator, sample: Callable[[torch.Tensor, torch.Tensor], float], rtol: float,
                     min_probes: int, max_probes: int, seed: int) -> TraceResult:
    """The mean of ``sample(z, Hz)`` over Rademacher z with its standard error, stopping at ``rtol·|mean|``."""
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 ≤ min_probes ≤ max_probes; got {min_probes}, {max_probes}")
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    start, t0 = op.products, time.perf_counter()
    converged = False
    while len(samples) < max_probes:
        z = _start_vector(rng, op.shape[0], op.device, "rademacher")
        samples.append(sample(z, op.apply(z)))
        if len(samples) >= min_probes:
            mean = float(np.mean(samples))
            se = float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
            if se <= rtol * abs(mean):
                converged = True
                break
    mean = float(np.mean(samples))
    se = float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    return TraceResult(trace=mean, stderr=se, probes=len(samples), hvps=op.products - start,
                       seconds=time.perf_counter() - t0, converged=converged)


def hutchpp_trace(op: CountingOperator, *, products: int = 99, seed: int = 0) -> TraceResult:
    """Hutch++ estimate of tr(H) from about ``products`` Hessian-vector products (a multiple of 3 is used: k
    sketch, k projection and k Hutchinson products, k = products // 3 ≥ 2). ``stderr`` is the standard error of the
    Hutchinson part (the sketched part is exact)."""
    k = products // 3
    if k < 2:
        raise ValueError(f"Hutch++ needs at least 6 products (3 × 2); got {products}")
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    start, t0 = op.products, time.perf_counter()
    k = min(k, n)
    sketch = torch.stack([op.apply(_start_vector(rng, n, op.device, "rademacher")) for _ in range(k)], dim=1)
    q, _ = torch.linalg.qr(sketch)  # n × k orthonormal basis of H S
    exact = sum(float(q[:, j] @ op.apply(q[:, j].contiguous())) for j in range(q.shape[1]))
    samples = []
    for _ in range(k):
        g = _start_vector(rng, n, op.device, "rademacher")
        g = g - q @ (q.T @ g)
        samples.append(float(g @ op.apply(g)))
    rest, se = float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    return TraceResult(trace=exact + rest, stderr=se, probes=k, hvps=op.products - start,
                       seconds=time.perf_counter() - t0, converged=True)


@dataclass(frozen=True)
class DiagonalResult:
    """diag(H) with a standard error per coordinate (zero where exact), from ``probes`` Rademacher vectors or, when
    ``exact``, from the n products e_iᵀHe_i."""

    diagonal: np.ndarray
    stderr: np.ndarray
    probes: int
    hvps: int
    seconds: float
    exact: bool


def hessian_diagonal(op: CountingOperator, *, probes: int = 100, exact_below: int = 0, seed: int = 0
                     ) -> DiagonalResult:
    """diag(H): exact from the n products He_i when n ≤ ``exact_below`` (a small block: n products), else
    Hutchinson's diagonal estimator d̂ = mean over Rademacher z of z ⊙ Hz (Bekas, Kokiopoulou & Saad 2007). It is
    unbiased — E[z_i(Hz)_i] = Σ_j H_ij E[z_i z_j] = H_ii — with per-coordinate variance Σ_{j≠i} H_ij² per probe; the
    standard error reported is the sample standard deviation of z_i(Hz)_i over √probes."""
    n = op.shape[0]
    start, t0 = op.products, time.perf_counter()
    if n <= exact_below:
        diagonal = np.empty(n)
        for i in range(n):
            e = torch.zeros(n, dtype=torch.float64, device=op.device)
            e[i] = 1.0
            diagonal[i] = float(op.apply(e)[i])
        return DiagonalResult(diagonal=diagonal, stderr=np.zeros(n), probes=0, hvps=op.products - start,
                              seconds=time.perf_counter() - t0, exact=True)
    if probes < 2:
        raise ValueError(f"the diagonal estimator needs at least 2 probes; got {probes}")
    rng = np.random.default_rng(seed)
    total = torch.zeros(n, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros(n, dtype=torch.float64, device=op.device)
    for _ in range(probes):
        z = _start_vector(rng, n, op.device, "rademacher")
        sample = z * op.apply(z)
        total += sample
        total_sq += sample * sample
    mean = total / probes
    var = (total_sq - probes * mean * mean).clamp_min(0.0) / (probes - 1)
    return DiagonalResult(diagonal=mean.cpu().numpy(), stderr=(var / probes).sqrt().cpu().numpy(), probes=probes,
                          hvps=op.products - start, seconds=time.perf_counter() - t0, exact=False)


def xdiag_diagonal(op: CountingOperator, *, products: int = 100, seed: int = 0) -> DiagonalResult:
    """diag(H) by XDiag (Epperly, Tropp & Webber, SIMAX 2024), ``products`` products (even): s = products/2 Rademacher
    vectors Ω, an orthonormal basis Q of HΩ, Z = HQ. For each i, leaving ω_i out of the basis (Q_iQ_iᵀ = Q(I −
    s_is_iᵀ)Qᵀ with s_i the normalised i-th column of R⁻ᵀ) gives an estimate diag(Q_iQ_iᵀH) + ω_i ⊙ (I − Q_iQ_iᵀ)Hω_i —
    exact on the sketched part, Hutchinson on the rest; XDiag is their mean, and the reported standard error their
    spread over √s. Unbiased; exact (to rounding) for an operator of rank < s, and far below Hutchinson's error at
    equal products when a few eigenvalues dominate."""
    n = op.shape[0]
    s = products // 2
    if products % 2 or not 2 <= s < n:
        raise ValueError(f"XDiag needs an even number of products, at least 4 and below 2n = {2 * n}; got {products}")
    start, t0 = op.products, time.perf_counter()
    rng = np.random.default_rng(seed)
    omega = torch.stack([_start_vector(rng, n, op.device, "rademacher") for _ in range(s)], dim=1)
    y = torch.stack([op.apply(omega[:, i].contiguous()) for i in range(s)], dim=1)
    q, r = torch.linalg.qr(y)
    z = torch.stack([op.apply(q[:, i].contiguous()) for i in range(s)], dim=1)  # H Q (H symmetric)
    r_inv_t = torch.linalg.inv(r.T)
    lever = r_inv_t / torch.linalg.vector_norm(r_inv_t, dim=0, keepdim=True)  # the s_i as columns
    base = (q * z).sum(dim=1)  # diag(Q Qᵀ H)
    c = z.T @ omega  # column i: Qᵀ H ω_i
    estimates = torch.empty((n, s), dtype=torch.float64, device=op.device)
    for i in range(s):
        si = lever[:, i]
        kept = c[:, i] - si * (si @ c[:, i])  # (I − s_i s_iᵀ) Qᵀ H ω_i
        rest = y[:, i] - q @ kept  # (I − Q_i Q_iᵀ) H ω_i
        estimates[:, i] = base - (q @ si) * (z @ si) + omega[:, i] * rest
    mean = estimates.mean(dim=1)
    stderr = estimates.std(dim=1, correction=1) / s ** 0.5
    return DiagonalResult(diagonal=mean.cpu().numpy(), stderr=stderr.cpu().numpy(), probes=s,
                          hvps=op.products - start, seconds=time.perf_counter() - t0, exact=False)


@dataclass(frozen=True)
class DensityResult:
    """Stochastic Lanczos quadrature: Ritz ``nodes`` and ``weights`` of every probe (``probe`` says which; each
    probe's weights sum to 1/probes), ``steps`` Lanczos steps per probe (fewer when an invariant subspace is found)."""

    nodes: np.ndarray
    weights: np.ndarray
    probe: np.ndarray
    probes: int
    steps: int
    hvps: int
    seconds: float


def spectral_density(op: CountingOperator, *, steps: int = 30, probes: int = 4, seed: int = 0) -> DensityResult:
    """The SLQ density of ``op`` (see the module docstring), full reorthogonalisation, Rademacher probes."""
    if steps < 1 or probes < 1:
        raise ValueError(f"need ≥ 1 Lanczos step and ≥ 1 probe; got {steps}, {probes}")
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    nodes, weights, which = [], [], []
    start, t0 = op.products, time.perf_counter()
    for i in range(probes):
        q = _start_vector(rng, n, op.device, "rademacher")
        for step in _lanczos_steps(op, q, min(steps, n)):
            if step[3] < 1e-12:  # β_m ≈ 0: invariant subspace, T_m is exact
                break
        evals, evecs = _ritz(step[1], step[2])  # T_m of the last step taken
        nodes.append(evals)
        weights.append(evecs[0] ** 2 / probes)
        which.append(np.full(len(evals), i))
    return DensityResult(np.concatenate(nodes), np.concatenate(weights), np.concatenate(which), probes,
                         min(steps, n), op.products - start, time.perf_counter() - t0)


def slq_density(
    op: CountingOperator, *, steps: int = 30, probes: int = 4, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ritz nodes and weights of :func:`spectral_density`."""
    r = spectral_density(op, steps=steps, probes=probes, seed=seed)
    return r.nodes, r.weights


def negative_mass(nodes: np.ndarray, weights: np.ndarray) -> float:
    """The share of the spectrum below zero: Σ τ_j over the Ritz nodes θ_j < 0 of a stochastic Lanczos quadrature
    (the weights of all probes sum to 1), an unbiased estimate of (number of negative eigenvalues)/n up to the
    quadrature's resolution — how far from convex the loss is at this point (Ghorbani et al. 2019).

    >>> negative_mass(np.array([-1.0, 0.5, 2.0]), np.array([0.25, 0.5, 0.25]))
    0.25
    """
    return float(np.sum(weights[nodes < 0]))


def broadened(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, width: float) -> np.ndarray:
    """The density Σ_j τ_j·N(λ; θ_j, width²) on ``grid`` (Gaussian broadening of the quadrature, as PyHessian
    draws it); integrates to Σ τ_j = 1 over the real line."""
    z = (grid[:, None] - nodes[None, :]) / width
    return (np.exp(-0.5 * z * z) / (width * np.sqrt(2 * np.pi))) @ weights


def block_operator(op: CountingOperator, index: torch.Tensor) -> CountingOperator:
    """The diagonal block H_BB of ``op`` on the coordinates ``index`` (v ↦ (H [v on B, 0 elsewhere])_B); its
    products count on ``op`` as well."""
    index = index.to(op.device)
    n = op.shape[0]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(n, dtype=v.dtype, device=v.device)
        full[index] = v
        return op.apply(full)[index]

    return CountingOperator(len(index), matvec, op.device)
