"""L-BFGS-B on a box with scipy's own routine, without scipy's per-variable Python loops.

Keskar's φ maximises over a box |y_i| ≤ ε(|x_i| + 1) of n = millions of variables with a few L-BFGS-B iterations.
``scipy.optimize.minimize(method="L-BFGS-B")`` spends most of that time in Python, not in the optimiser: it converts
the bounds element by element (``old_bound_to_new``, ``new_bounds_to_old``) and builds the bound types in a
``for i in range(n)`` loop — seconds per call for a few million variables, against a fraction of a second in the
optimiser's own steps. :func:`minimize_box` drives the same compiled routine (``scipy.optimize._lbfgsb.setulb``,
the C translation of L-BFGS-B 3.0 that SciPy ≥ 1.15 ships) with the same arguments, set up with array operations:
the same iterates, function values, evaluation counts and stopping messages as ``minimize`` (tested equal to the
last bit), so φ does not change. Where that routine has another signature (SciPy < 1.15, whose Fortran driver takes
a character task), it falls back to ``minimize`` itself — slower, the same numbers.

The objective still runs on its device; the optimiser's vectors live on the host (L-BFGS-B is a host routine), so
each evaluation moves x to the device and the gradient back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, minimize

try:  # the compiled routine and its messages (private to SciPy: used only with the signature checked below)
    from scipy.optimize import _lbfgsb, _lbfgsb_py

    _STATUS = getattr(_lbfgsb_py, "status_messages", None)
    _TASK = getattr(_lbfgsb_py, "task_messages", None)
    DIRECT = _STATUS is not None and _TASK is not None and hasattr(_lbfgsb, "setulb")
except ImportError:  # pragma: no cover - every SciPy has them
    DIRECT = False

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]
#: SciPy's L-BFGS-B defaults, which :func:`minimize_box` shares.
_DEFAULTS = {"maxiter": 15000, "maxfun": 15000, "maxcor": 10, "ftol": 2.220446049250313e-09, "gtol": 1e-5, "maxls": 20}


@dataclass(frozen=True)
class BoxResult:
    """The minimiser's end: the last iterate ``x`` and its value ``fun``, function evaluations, iterations, SciPy's
    message, and whether it converged (not stopped by a limit)."""

    x: np.ndarray
    fun: float
    nfev: int
    nit: int
    message: str
    success: bool


def minimize_box(fun_and_grad: FunAndGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, *,
                 maxiter: int = _DEFAULTS["maxiter"], maxfun: int = _DEFAULTS["maxfun"],
                 maxcor: int = _DEFAULTS["maxcor"], ftol: float = _DEFAULTS["ftol"], gtol: float = _DEFAULTS["gtol"],
                 maxls: int = _DEFAULTS["maxls"]) -> BoxResult:
    """Minimise ``fun_and_grad`` (x ↦ (f, ∇f), float64) over lower ≤ x ≤ upper from ``x0`` by L-BFGS-B, exactly as
    ``scipy.optimize.minimize(..., method="L-BFGS-B", bounds=Bounds(lower, upper), options=...)`` with the same
    options does (its defaults are these), without its per-variable Python work."""
    options = {"maxiter": maxiter, "maxfun": maxfun, "maxcor": maxcor, "ftol": ftol, "gtol": gtol, "maxls": maxls}
    run = _direct if _direct_works() else _with_minimize
    return run(fun_and_grad, x0, lower, upper, **options)


def _direct(fun_and_grad: FunAndGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, *, maxiter: int,
            maxfun: int, maxcor: int, ftol: float, gtol: float, maxls: int) -> BoxResult:
    """:func:`minimize_box` through the compiled routine itself: ``minimize``'s driver loop, its set-up vectorised."""
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    n = x0.size
    if lower.shape != (n,) or upper.shape != (n,):
        raise ValueError(f"bounds of shapes {lower.shape} and {upper.shape} for {n} variables")
    if (lower > upper).any():
        raise ValueError("L-BFGS-B: one of the lower bounds is greater than an upper bound")
    has_low, has_up = np.isfinite(lower), np.isfinite(upper)
    nbd = np.zeros(n, np.int32)  # 0 unbounded, 1 lower only, 2 both, 3 upper only (L-BFGS-B's codes)
    nbd[has_low & ~has_up] = 1
    nbd[has_low & has_up] = 2
    nbd[~has_low & has_up] = 3
    low_bnd = np.where(has_low, lower, 0.0)
    upper_bnd = np.where(has_up, upper, 0.0)
    m, factr, pgtol = maxcor, ftol / np.finfo(float).eps, gtol

    x = np.clip(np.asarray(x0, dtype=np.float64), lower, upper).copy()
    # SciPy's ScalarFunction evaluates at x0 once when it is set up, and again only where x has moved
    cache = {"x": x.copy(), "nfev": 1}
    cache["f"], cache["g"] = _evaluate(fun_and_grad, x)

    def func_and_grad(at: np.ndarray) -> tuple[float, np.ndarray]:
        if not np.array_equal(at, cache["x"]):
            cache["x"] = at.copy()
            cache["f"], cache["g"] = _evaluate(fun_and_grad, at)
            cache["nfev"] += 1
        return cache["f"], cache["g"]

    f = np.array(0.0, dtype=np.float64)
    g = np.zeros((n,), dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    iterations = 0
    while True:
        g = g.astype(np.float64)
        _lbfgsb.setulb(m, x, low_bnd, upper_bnd, nbd, f, g, factr, pgtol, wa, iwa, task, lsave, isave, dsave,
                       maxls, ln_task)
        if task[0] == 3:  # the routine wants f and g at the current x
            f, g = func_and_grad(x)
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if iterations >= maxiter:
                task[0], task[1] = 5, 504
            elif cache["nfev"] > maxfun:
                task[0], task[1] = 5, 502
        else:
            break
    limited = cache["nfev"] > maxfun or iterations >= maxiter
    return BoxResult(x=x, fun=float(f), nfev=int(cache["nfev"]), nit=iterations,
                     message=f"{_STATUS[task[0]]}: {_TASK[task[1]]}", success=task[0] == 4 and not limited)


@functools.cache
def _direct_works() -> bool:
    """Whether driving the compiled routine directly gives ``minimize``'s answer, checked once per process on a small
    bounded quadratic (a SciPy whose routine takes other arguments fails here and is left to ``minimize``)."""
    if not DIRECT:
        return False
    c = np.array([3.0, -2.0, 0.5, 1.5])
    problem = (lambda y: (float(0.5 * y @ y - c @ y), y - c), np.zeros(4), -np.ones(4), np.ones(4))
    try:
        ours = _direct(*problem, **_DEFAULTS)
    except (TypeError, ValueError, IndexError):
        return False
    theirs = _with_minimize(*problem, **_DEFAULTS)
    return bool(np.array_equal(ours.x, theirs.x) and ours.nfev == theirs.nfev and ours.nit == theirs.nit)


def _evaluate(fun_and_grad: FunAndGrad, x: np.ndarray) -> tuple[float, np.ndarray]:
    """The value and gradient at a copy of ``x`` (the routine works on x in place), as SciPy calls them."""
    f, g = fun_and_grad(np.copy(x))
    return float(f), np.asarray(g, dtype=np.float64).reshape(-1)


def _with_minimize(fun_and_grad: FunAndGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                   **options: float) -> BoxResult:
    """The same minimisation through ``scipy.optimize.minimize`` (where the compiled routine differs); options not
    given take SciPy's defaults, the same as :data:`_DEFAULTS`."""
    res = minimize(fun_and_grad, x0, jac=True, method="L-BFGS-B", bounds=Bounds(lower, upper), options=options)
    return BoxResult(x=res.x, fun=float(res.fun), nfev=int(res.nfev), nit=int(res.nit), message=str(res.message),
                     success=bool(res.success))
