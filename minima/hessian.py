"""Hessian of the training loss: a scipy ``LinearOperator``, top-k eigenvalues with error bounds, and
Hutchinson's trace estimate.

* **Eigenvalues** come from Lanczos (ARPACK's implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh``,
  ``which="LA"``: the algebraically largest). Each returned Ritz pair (λ̂, x̂), ‖x̂‖ = 1, carries the residual
  r = ‖H x̂ − λ̂ x̂‖, computed with one extra Hessian-vector product. For a symmetric H some eigenvalue λ
  satisfies |λ − λ̂| ≤ r, so ``r / |λ̂|`` is a rigorous bound on the relative error (when the pair is the one
  sought — Lanczos finds extreme eigenvalues first).
* **Trace**: tr(H) = E[zᵀHz] for Rademacher z; the mean over probes with its standard error
  s/√m, stopping once the standard error is below ``rtol·|mean|`` (after ``min_probes``) or at ``max_probes``.

HVP counts are reported with every result: HVPs are what curvature estimation costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh


class CountingOperator(LinearOperator):
    """``LinearOperator`` for a symmetric n×n matrix given by ``matvec``, counting products."""

    def __init__(self, n: int, matvec: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(dtype=np.float64, shape=(n, n))
        self._hv = matvec
        self.products = 0

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        self.products += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        return self._hv(v).numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:  # symmetric
        return self._matvec(x)


def hessian_operator(objective: object) -> CountingOperator:
    """The Hessian of a :class:`minima.objective.DatasetObjective` at its current parameters."""
    return CountingOperator(objective.numel, objective.hvp)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EigenResult:
    """Top eigenvalues (descending) with residual-based absolute error bounds and costs."""

    eigenvalues: np.ndarray
    residuals: np.ndarray
    hvps: int
    seconds: float
    tol: float
    ncv: int
    eigenvectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def relative_error_bounds(self) -> np.ndarray:
        return self.residuals / np.maximum(np.abs(self.eigenvalues), 1e-300)


def top_eigenvalues(
    op: CountingOperator, k: int = 1, *, tol: float = 1e-3, ncv: int | None = None, seed: int = 0,
    maxiter: int | None = None, return_vectors: bool = False,
) -> EigenResult:
    """The ``k`` algebraically largest eigenvalues of the symmetric operator by Lanczos.

    ``tol`` is ARPACK's relative accuracy target for the Ritz values; the returned ``residuals`` bound the
    actual absolute error. ``ncv`` (Lanczos basis size) defaults to ``max(2k + 1, k + 8)`` — small bases
    restart more but waste fewer products when only a few eigenvalues are wanted.
    """
    n = op.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for an operator of size {n}; got {k}")
    ncv = min(n, ncv if ncv is not None else max(2 * k + 1, k + 8))
    v0 = np.random.default_rng(seed).standard_normal(n)
    start = op.products
    t0 = time.perf_counter()
    vals, vecs = eigsh(op, k=k, which="LA", tol=tol, ncv=ncv, v0=v0, maxiter=maxiter)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    residuals = np.empty(k)
    for j in range(k):
        x = vecs[:, j] / np.linalg.norm(vecs[:, j])
        residuals[j] = np.linalg.norm(op.matvec(x) - vals[j] * x)
    return EigenResult(eigenvalues=vals, residuals=residuals, hvps=op.products - start,
                       seconds=time.perf_counter() - t0, tol=tol, ncv=ncv,
                       eigenvectors=vecs if return_vectors else None)


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
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 ≤ min_probes ≤ max_probes; got {min_probes}, {max_probes}")
    rng = np.random.default_rng(seed)
    samples: list[float] = []
    start, t0 = op.products, time.perf_counter()
    converged = False
    while len(samples) < max_probes:
        z = rng.integers(0, 2, op.shape[0]).astype(np.float64) * 2.0 - 1.0
        samples.append(float(z @ op.matvec(z)))
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


def slq_density(
    op: CountingOperator, *, steps: int = 30, probes: int = 4, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density by stochastic Lanczos quadrature: Ritz nodes and weights (each probe's weights sum
    to 1/probes), from ``steps`` Lanczos steps with full reorthogonalisation per Rademacher probe."""
    rng = np.random.default_rng(seed)
    n = op.shape[0]
    nodes, weights = [], []
    for _ in range(probes):
        q = rng.integers(0, 2, n).astype(np.float64) * 2.0 - 1.0
        q /= np.linalg.norm(q)
        basis = [q]
        alphas, betas = [], []
        for j in range(min(steps, n)):
            w = op.matvec(basis[-1])
            a = float(w @ basis[-1])
            alphas.append(a)
            w = w - a * basis[-1] - (betas[-1] * basis[-2] if j > 0 else 0.0)
            for b in basis:  # full reorthogonalisation keeps ghost eigenvalues out
                w -= (w @ b) * b
            beta = float(np.linalg.norm(w))
            if beta < 1e-12 or j == steps - 1:
                break
            betas.append(beta)
            basis.append(w / beta)
        tri = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
        evals, evecs = np.linalg.eigh(tri)
        nodes.append(evals)
        weights.append(evecs[0] ** 2 / probes)
    return np.concatenate(nodes), np.concatenate(weights)
