"""The metric registry: every sharpness/curvature metric the measurement study can run, with its parameters.

A :class:`Metric` declares its parameters (:class:`Param`: name, type, default, help, unit), how one request of it
becomes result entries (``jobs``: result name → the parameters that entry was computed with), the function that
computes an entry on an objective (``compute``), and the fields its result holds (``fields``). From the registry
come the ``--metrics`` choices, the command-line flags of every parameter, the names under
``sharpness/<checkpoint>/`` in the HDF5 file and the resume keys. Adding a metric is its function (in its own
module) and one :func:`register` call here.

``compute(objective, x, f0, params, seed)`` gets a :class:`minima.curvature.objective.DatasetObjective` positioned
at the checkpoint's parameters ``x`` (float64 vector) with f(x) = ``f0``, and returns ``{"value": headline number,
**fields}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from minima.core import distributed
from minima.core.vocab import (
    DiagMethod,
    EigenWhich,
    L2Step,
    PacBayesConvention,
    TraceMethod,
    WorstLoop,
    WorstNorm,
    check_choice,
)
from minima.curvature.alphasharp import AlphaSearch, alpha_sharpness
from minima.curvature.blocks import flat_index
from minima.curvature.hessian import (
    CountingOperator,
    EigenMethod,
    block_operator,
    fisher_operator,
    ggn_operator,
    hessian_diagonal,
    hessian_operator,
    hutchinson_trace,
    hutchpp_trace,
    negative_mass,
    spectral_density,
    squared_frobenius,
    top_eigenvalues,
    xdiag_diagonal,
)
from minima.curvature.measures import RandomSubspace, adaptive_sharpness, average_sharpness, keskar_sharpness
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.pacbayes import MEASURES as PACBAYES_MEASURES
from minima.curvature.pacbayes import NEEDS_INIT as PACBAYES_NEEDS_INIT
from minima.curvature.pacbayes import SigmaSearch
from minima.curvature.pacbayes import measures as pacbayes_measures
from minima.curvature.worstcase import worst_case_sharpness
from minima.geometry.norms import MEASURES as NORM_MEASURES
from minima.geometry.norms import NEEDS_INIT, logit_terms, margin, relative_flatness_terms
from minima.geometry.norms import measures as norm_measures

Job = tuple[str, dict[str, Any]]
MEASURED = "measured_images"  # key of a jobs function's mapping: how many training images are measured, when known


@dataclass(frozen=True)
class Param:
    """One parameter of a metric: a request field and command-line flag of the same name."""

    name: str
    type: Any
    default: Any
    help: str
    unit: str = ""
    default_text: str | None = None


@dataclass(frozen=True)
class Metric:
    """A registered metric (see the module docstring)."""

    name: str
    summary: str
    params: tuple[Param, ...]
    jobs: Callable[[Mapping[str, Any]], list[Job]]
    compute: Callable[[DatasetObjective, torch.Tensor, float, Mapping[str, Any], int], dict[str, Any]]
    fields: tuple[str, ...]
    uses_hessian: bool = False
    # measured per diagonal Hessian block when the request asks for blocks (minima.curvature.blocks)
    blockwise: bool = False
    # expected evaluations over the data of one job ({"f": n, "grad": n, "hvp": n}), for the estimate printed before
    # a measurement and its progress bar; None: unknown
    cost: Callable[[Mapping[str, Any]], dict[str, int]] | None = None


REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to the registry (its name and parameter names must be new: parameters become flags)."""
    if metric.name in REGISTRY:
        raise ValueError(f"metric {metric.name!r} is already registered")
    taken = {p.name for m in REGISTRY.values() for p in m.params}
    clash = sorted(taken & {p.name for p in metric.params})
    if clash:
        raise ValueError(f"metric {metric.name!r} declares parameter(s) {clash} that another metric already has")
    REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; ``ValueError`` listing the choices for an unknown name."""
    if name not in REGISTRY:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[name]


def all_params() -> list[Param]:
    """Every registered metric's parameters, in registration order."""
    return [p for m in REGISTRY.values() for p in m.params]


ENTRY_POINT_GROUP = "minima.metrics"
_PLUGINS_LOADED: set[str] = set()


def load_plugins() -> list[str]:
    """Register the metrics of installed packages that declare them under the ``minima.metrics`` entry-point group
    (``[project.entry-points."minima.metrics"] name = "package.module:metric"``): the object an entry point names
    is a :class:`Metric` (registered here) or a function that registers its metrics. Installing a package is the
    permission to import it, as for any plugin; each entry point is loaded once. Returns the names loaded now; a
    plugin that fails to load is a ``ValueError`` naming it and its distribution."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _PLUGINS_LOADED:
            continue
        _PLUGINS_LOADED.add(ep.value)
        source = f"metric plugin {ep.name!r} ({ep.value}" + (f", from {ep.dist.name}" if ep.dist else "") + ")"
        try:
            target = ep.load()
            if isinstance(target, Metric):
                register(target)
            elif callable(target):
                target()
            else:
                raise TypeError(f"it names a {type(target).__name__}, not a Metric or a function that registers one")
        except Exception as exc:  # a plugin's own failure, whatever it is, becomes one line naming the plugin
            raise ValueError(f"{source} failed to load: {exc}") from exc
        loaded.append(ep.name)
    return loaded


# ----------------------------------------------------------------------------------------------- Keskar
def _keskar_jobs(p: Mapping[str, Any]) -> list[Job]:
    jobs: list[Job] = []
    for eps in p["eps"]:
        if p["full_space"]:
            jobs.append((f"keskar_full_eps{eps:g}", {"eps": eps, "p": None, "maxiter": p["maxiter"]}))
        if p["subspace"]:
            jobs.append((f"keskar_sub{p['subspace']}_seed{p['subspace_seed']}_eps{eps:g}",
                         {"eps": eps, "p": p["subspace"], "seed": p["subspace_seed"], "maxiter": p["maxiter"]}))
    return jobs


def _keskar(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    sub = RandomSubspace(obj.numel, job["p"], seed=job["seed"], device=x.device) if job["p"] else None
    r = keskar_sharpness(obj.value_and_grad, x, job["eps"], subspace=sub, maxiter=job["maxiter"], f0=f0)
    return {"value": r.phi, **asdict(r)}


register(Metric(
    name="keskar", summary="Keskar et al.'s ε-sharpness φ (percent), full space and/or a random subspace",
    params=(
        Param("eps", tuple[float, ...], (1e-3, 5e-4), "box sizes ε (one result per ε)", "relative to |(A⁺x)_i| + 1"),
        Param("subspace", int | None, 100, "random subspace dimension p (0 or none: no subspace)"),
        Param("subspace_seed", int, 0, "seed of the random subspace matrix"),
        Param("full_space", bool, True, "also measure with A = I (the full parameter space)"),
        Param("maxiter", int, 10, "L-BFGS-B iterations (the paper: 10)"),
    ),
    jobs=_keskar_jobs, compute=_keskar,
    cost=lambda job: {"grad": job["maxiter"] + 1, **(
        {"subspace_columns": job["p"], "subspace_products": job["p"] ** 2 // 2,
         "subspace_passes": job["p"] * (job["maxiter"] + 2)} if job["p"] else {"lbfgsb": 1})},
    fields=("phi", "f0", "f_max", "eps", "p", "seed", "function_evals", "iterations", "hit_iteration_limit",
            "message", "seconds"),
))


# --------------------------------------------------------------------------------------- Hessian spectrum
def _operator(obj: DatasetObjective, job: Mapping[str, Any], seed: int = 0) -> CountingOperator:
    """The Hessian of ``obj`` — or, for ``job["curvature"]``, its generalised Gauss–Newton matrix (``ggn``), empirical
    Fisher (``ef``) or Monte-Carlo Fisher (``fisher``, labels drawn with ``seed``) — or its diagonal block on the
    parameters ``job["block_params"]``."""
    kind = job.get("curvature", "hessian")
    op = (ggn_operator(obj) if kind == "ggn" else fisher_operator(obj, "empirical") if kind == "ef" else
          fisher_operator(obj, "mc", seed) if kind == "fisher" else hessian_operator(obj))
    if "block_params" not in job:
        return op
    named = [(n, p.numel()) for n, p in zip(obj.names, obj.params, strict=True)]
    return block_operator(op, flat_index(named, job["block_params"]))


def _hessian(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    # job["warm_start"] (the training probes' option): start from that vector and hand back the new top Ritz vector
    warm = "warm_start" in job
    r = top_eigenvalues(_operator(obj, job, seed), k=job["k"], tol=job["tol"], method=job["method"], seed=seed,
                        warm_start=job.get("warm_start"), return_vectors=warm, which=job.get("which", "largest"))
    return {"value": float(r.eigenvalues[0]), "eigenvalues": r.eigenvalues, "residuals": r.residuals,
            "relative_error_bounds": r.relative_error_bounds, "hvps": r.hvps, "seconds": r.seconds,
            "tol": r.tol, "ncv": r.ncv, "method": r.method, "converged": r.converged,
            **({"top_vector": r.eigenvectors[:, 0]} if warm else {})}


def _hessian_jobs(p: Mapping[str, Any]) -> list[Job]:
    """``hessian_top{k}`` (the largest; its job has no ``which``, as before the smallest existed, so earlier results
    resume) and/or ``hessian_bottom{k}`` (the smallest)."""
    check_choice("--eig-which", p["eig_which"], EigenWhich)
    job = {"k": p["topk"], "tol": p["eig_tol"], "method": p["eig_method"]}
    ends = {"largest": ("largest",), "smallest": ("smallest",), "both": ("largest", "smallest")}[p["eig_which"]]
    return [(f"hessian_top{p['topk']}", job) if end == "largest" else
            (f"hessian_bottom{p['topk']}", {**job, "which": "smallest"}) for end in ends]


register(Metric(
    name="hessian", summary="top-k Hessian eigenvalues with residual error bounds (value: λ_max; with --eig-which "
    "smallest or both also the k smallest, value λ_min)",
    params=(
        Param("topk", int, 5, "number of eigenvalues at each end asked for"),
        Param("eig_tol", float, 1e-3, "stop once every eigenvalue's residual bound is ≤ this × |eigenvalue| (the "
              "smallest: × max(|eigenvalue|, the largest |Ritz value|))"),
        Param("eig_method", EigenMethod, "lanczos", "lanczos: full reorthogonalisation, fewest products, stores "
              "its basis; arpack: scipy eigsh, bounded memory"),
        Param("eig_which", EigenWhich, "largest", "the largest eigenvalues (hessian_topK), the smallest — negative "
              "ones included: saddles — (hessian_bottomK), or both"),
    ),
    jobs=_hessian_jobs,
    compute=_hessian, uses_hessian=True, blockwise=True,
    cost=lambda job: {"hvp": 10 + 5 * job["k"]},  # Lanczos: ~11–16 for k = 1
    fields=("eigenvalues", "residuals", "relative_error_bounds", "hvps", "seconds", "tol", "ncv", "method",
            "converged"),
))


# ----------------------------------------------------------------------------------------- Hessian trace
def _trace(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    op = _operator(obj, job, seed)
    if job.get("method", "hutchinson") == "hutchpp":
        r = hutchpp_trace(op, products=job["max_probes"], seed=seed)
    else:
        r = hutchinson_trace(op, rtol=job["rtol"], max_probes=job["max_probes"], seed=seed)
    return {"value": r.trace, **asdict(r)}


def _trace_jobs(p: Mapping[str, Any]) -> list[Job]:
    if p["trace_method"] == "hutchpp":  # a fixed budget of products: no stopping rule
        return [("trace_hutchpp", {"method": "hutchpp", "max_probes": p["trace_max_probes"]})]
    return [("trace", {"rtol": p["trace_rtol"], "max_probes": p["trace_max_probes"]})]


register(Metric(
    name="trace", summary="Hessian trace with its standard error: Hutchinson, or Hutch++ (Meyer et al. 2021)",
    params=(
        Param("trace_rtol", float, 1e-2, "Hutchinson: stop at this relative standard error"),
        Param("trace_max_probes", int, 100, "Hutchinson: most Rademacher probes; Hutch++: its budget", "products"),
        Param("trace_method", TraceMethod, "hutchinson", "hutchinson (stops at --trace-rtol) or hutchpp (a third of "
              "the products sketch the top of the spectrum, taken exactly; far smaller error when a few eigenvalues "
              "dominate)"),
    ),
    jobs=_trace_jobs, compute=_trace, uses_hessian=True, blockwise=True,
    cost=lambda job: {"hvp": job["max_probes"]},  # at most
    fields=("trace", "stderr", "probes", "hvps", "seconds", "converged"),
))


# ------------------------------------------------------------------- diagonal and squared Frobenius norm
def _tensor_sizes(obj: DatasetObjective, job: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(parameter name, size) in the order of the operator's coordinates: the model's, or the block's."""
    named = [(n, p.numel()) for n, p in zip(obj.names, obj.params, strict=True)]
    if "block_params" not in job:
        return named
    sizes = dict(named)
    return [(n, sizes[n]) for n in job["block_params"]]


def _diagonal(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
              ) -> dict[str, Any]:
    op = _operator(obj, job, seed)
    r = (xdiag_diagonal(op, products=job["probes"], seed=seed)
         if job.get("method") == "xdiag" and op.shape[0] > job["exact_below"] else
         hessian_diagonal(op, probes=job["probes"], exact_below=job["exact_below"], seed=seed))
    per_tensor, start = {}, 0
    for name, size in _tensor_sizes(obj, job):
        part, err = r.diagonal[start:start + size], r.stderr[start:start + size]
        per_tensor[name] = {"size": size, "sum": float(part.sum()), "sum_sq": float((part ** 2).sum()),
                            "sum_stderr": float(np.sqrt((err ** 2).sum()))}
        start += size
    return {"value": float((r.diagonal ** 2).sum()), "diagonal": r.diagonal, "stderr": r.stderr,
            "sum": float(r.diagonal.sum()), "sum_sq": float((r.diagonal ** 2).sum()), "per_tensor": per_tensor,
            "probes": r.probes, "hvps": r.hvps, "seconds": r.seconds, "exact": r.exact}


def _diagonal_jobs(p: Mapping[str, Any]) -> list[Job]:
    check_choice("--diag-method", p["diag_method"], DiagMethod)
    if p["diag_probes"] < 2 or p["diag_exact_below"] < 0:
        raise ValueError(f"--diag-probes must be ≥ 2 and --diag-exact-below ≥ 0; got {p['diag_probes']}, "
                         f"{p['diag_exact_below']}")
    if p["diag_method"] == "xdiag":
        if p["diag_probes"] % 2 or p["diag_probes"] < 4:
            raise ValueError(f"--diag-method xdiag takes an even --diag-probes ≥ 4 (half sketch, half probes); got "
                             f"{p['diag_probes']}")
        return [(f"diagonal_xdiag{p['diag_probes']}", {"probes": p["diag_probes"], "exact_below":
                                                       p["diag_exact_below"], "method": "xdiag"})]
    return [(f"diagonal_probes{p['diag_probes']}", {"probes": p["diag_probes"],
                                                    "exact_below": p["diag_exact_below"]})]


register(Metric(
    name="diagonal", summary="the Hessian diagonal by Hutchinson's estimator or XDiag (exact on small blocks), its "
    "standard errors and per-tensor sums (value: Σ diag², the diagonal's squared norm)",
    params=(
        Param("diag_probes", int, 100, "products of the diagonal estimator (Hutchinson: its Rademacher probes; XDiag: "
              "half sketch, half probes)", "products"),
        Param("diag_method", DiagMethod, "hutchinson", "hutchinson (z ⊙ Hz) or xdiag (Epperly, Tropp & Webber 2024: "
              "exact on a sketch of the top of the spectrum, exchangeable; far smaller error when a few eigenvalues "
              "dominate)"),
        Param("diag_exact_below", int, 0, "compute the diagonal exactly (one product per coordinate) for an operator "
              "(a block, with --blocks) of at most this many parameters; 0: never"),
    ),
    jobs=_diagonal_jobs, compute=_diagonal, uses_hessian=True, blockwise=True,
    cost=lambda job: {"hvp": job["probes"]},  # the exact diagonal of a small block: its size instead
    fields=("diagonal", "stderr", "sum", "sum_sq", "per_tensor", "probes", "hvps", "seconds", "exact"),
))


def _trace_sq(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
              ) -> dict[str, Any]:
    r = squared_frobenius(_operator(obj, job, seed), rtol=job["rtol"], max_probes=job["max_probes"], seed=seed)
    return {"value": r.trace, **asdict(r)}


register(Metric(
    name="trace_sq", summary="tr(H²) = ‖H‖_F² = Σ λ_i² by Hutchinson on ‖Hz‖², with its standard error",
    params=(
        Param("trace_sq_rtol", float, 1e-2, "stop at this relative standard error"),
        Param("trace_sq_max_probes", int, 100, "most Rademacher probes", "products"),
    ),
    jobs=lambda p: [("trace_sq", {"rtol": p["trace_sq_rtol"], "max_probes": p["trace_sq_max_probes"]})],
    compute=_trace_sq, uses_hessian=True, blockwise=True, cost=lambda job: {"hvp": job["max_probes"]},
    fields=("trace", "stderr", "probes", "hvps", "seconds", "converged"),
))


# ------------------------------------------------------------------------------------ spectral density
def _density(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
             ) -> dict[str, Any]:
    op = _operator(obj, job, seed)
    r = spectral_density(op, steps=job["steps"], probes=job["probes"], seed=seed)
    return {"value": float(r.nodes.max()), "nodes": r.nodes, "weights": r.weights, "probe": r.probe,
            "probes": r.probes, "steps": r.steps, "dimension": op.shape[0], "hvps": r.hvps, "seconds": r.seconds,
            "smallest": float(r.nodes.min()), "negative_mass": negative_mass(r.nodes, r.weights)}


register(Metric(
    name="density", summary="Hessian eigenvalue density by stochastic Lanczos quadrature (value: largest Ritz value; "
    "python -m minima.plot draws it)",
    params=(
        Param("density_probes", int, 4, "Rademacher probes (independent Lanczos runs)"),
        Param("density_steps", int, 60, "Lanczos steps per probe (full reorthogonalisation)"),
    ),
    jobs=lambda p: [(f"density_m{p['density_steps']}_probes{p['density_probes']}",
                     {"steps": p["density_steps"], "probes": p["density_probes"]})],
    compute=_density, uses_hessian=True, blockwise=True, cost=lambda job: {"hvp": job["steps"] * job["probes"]},
    fields=("nodes", "weights", "probe", "probes", "steps", "dimension", "hvps", "seconds", "smallest",
            "negative_mass"),
))


# ---------------------------------------------------------------------------------- adaptive / average
def _adaptive(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    r = adaptive_sharpness(obj.value_and_grad, x, job["rho"], steps=job["steps"])
    return {"value": r.sharpness, **asdict(r)}


register(Metric(
    name="adaptive", summary="adaptive worst-case L∞ ρ-sharpness (invariant to ReLU rescaling)",
    params=(
        Param("rho", float, 0.05, "box radius", "relative to |w_i|"),
        Param("adaptive_steps", int, 10, "projected sign-gradient ascent steps"),
    ),
    jobs=lambda p: [(f"adaptive_rho{p['rho']:g}", {"rho": p["rho"], "steps": p["adaptive_steps"]})],
    compute=_adaptive, cost=lambda job: {"grad": job["steps"] + 1},
    fields=("sharpness", "f0", "f_max", "rho", "steps", "seconds"),
))


def _average(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    r = average_sharpness(obj.value, x, job["sigma"], samples=job["samples"], seed=seed)
    return {"value": r.sharpness, **asdict(r)}


register(Metric(
    name="average", summary="average-case sharpness E[f(w + δ)] − f(w), δ_i ~ N(0, (σ|w_i|)²)",
    params=(
        Param("sigma", float, 0.01, "noise scale", "relative to |w_i|"),
        Param("average_samples", int, 10, "Monte-Carlo draws"),
    ),
    jobs=lambda p: [(f"average_sigma{p['sigma']:g}", {"sigma": p["sigma"], "samples": p["average_samples"]})],
    compute=_average, cost=lambda job: {"f": job["samples"] + 1},
    fields=("sharpness", "stderr", "f0", "sigma", "samples", "seed", "seconds"),
))


# ------------------------------------------------------------------------- norm and margin measures
def _chosen_measures(p: Mapping[str, Any], names_param: str, init_param: str, every: Sequence[str],
                     needs_init: Sequence[str]) -> list[str]:
    """The measures a request of a family of measures names (``names_param``; default every one its initial weights
    allow), refused in one line when one is unknown or needs the initial weights (``init_param``) it lacks."""
    flag, init_flag = (f"--{name.replace('_', '-')}" for name in (names_param, init_param))
    names = list(p[names_param]) or [n for n in every if p[init_param] or n not in needs_init]
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise ValueError(f"{flag}: unknown {unknown}; choose from {list(every)}")
    if not p[init_param] and set(names) & set(needs_init):
        raise ValueError(f"{flag} {sorted(set(names) & set(needs_init))} need the initial weights: {init_flag} "
                         "RUN/init.pt (the zoo sets it to each run's own)")
    return names


def _init_model(path: str | None, dtype: torch.dtype) -> torch.nn.Module | None:
    """The network of the initial weights' checkpoint ``path`` (None without one)."""
    if not path:
        return None
    from minima.files import checkpoint as ckpt_io

    return ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(path)).to(dtype)


def _once_per_point(obj: DatasetObjective, x: torch.Tensor, key: Any, compute: Callable[[], dict[str, float]]
                    ) -> dict[str, float]:
    """``compute()`` once per objective, point ``x`` and ``key`` (the settings): the jobs of one request of a family of
    measures share one computation of them all, and read their own entry."""
    cached = getattr(obj, "_measures_cache", None)
    if cached is None or cached[0] != key or not torch.equal(cached[1], x):
        obj._measures_cache = (key, x.clone(), compute())
    return obj._measures_cache[2]


def _norm_values(obj: DatasetObjective, init_path: str | None, adjust: bool) -> dict[str, float]:
    """Every measure of :mod:`minima.geometry.norms` at the objective's point: one pass over the data for the margins
    and the Fisher–Rao terms, one for the relative flatness."""
    values, fisher = logit_terms(obj.model, obj.batches)
    values = distributed.all_gather_cat(values)
    flat = relative_flatness_terms(obj.model, obj.batches)
    sums = distributed.all_reduce_sum(torch.tensor([float(fisher.sum()), float(flat.sum()), float(len(fisher))],
                                                   dtype=torch.float64))
    found = norm_measures(obj.model, tuple(obj.batches[0][0].shape[1:]), values, _init_model(init_path, obj.dtype),
                          adjust, fisher_rao_mean=float(sums[0] / sums[2]),
                          relative_flatness_mean=float(sums[1] / sums[2]))
    found["_margin"], found["_samples"] = margin(values), float(len(values))
    return found


def _norm_jobs(p: Mapping[str, Any]) -> list[Job]:
    names = _chosen_measures(p, "norm_measures", "norms_init", NORM_MEASURES, NEEDS_INIT)
    return [(f"norm_{n}", {"measure": n, "init": p["norms_init"] or "", "adjust": p["norms_adjust"]}) for n in names]


def _norms(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()  # the first job of a request computes them all; the others read them
    found = _once_per_point(obj, x, ("norms", job["init"] or None, job["adjust"]),
                            lambda: _norm_values(obj, job["init"] or None, job["adjust"]))
    return {"value": found[job["measure"]], "margin": found["_margin"], "samples": int(found["_samples"]),
            "seconds": time.perf_counter() - t0}


register(Metric(
    name="norms", summary="norm- and margin-based measures of Jiang et al. 2020 as Dziugaite et al. 2020 compute them "
    "(BatchNorm folded, weights only, squared layer norms, exact convolution spectral norms, 10th-percentile margin)",
    params=(
        Param("norm_measures", tuple[str, ...], (), "which of them (default: all; the ones from initialisation "
              "only with --norms-init)", default_text="all"),
        Param("norms_init", str | None, None, "the initial weights' checkpoint, for fro_dist, dist_spec_init and "
              "log_spec_init_main", default_text="none"),
        Param("norms_adjust", bool, True, "report as Dziugaite et al.: ½(v − log m) for log measures, √(v/m) for "
              "the others (m training samples)"),
    ),
    jobs=_norm_jobs, compute=_norms, cost=lambda job: {"f": 1},
    fields=("margin", "samples", "seconds"),
))


# ------------------------------------------------------------------------------------- worst-case (APGD)
class NormalisedLogits(torch.nn.Module):
    """``model``'s logits divided by their Euclidean norm per sample (Andriushchenko et al.'s logit normalisation:
    the loss no longer changes when the last layer is scaled). Parameters in ``model``'s order."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``x``, each sample's divided by its Euclidean norm."""
        z = self.model(x)
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def check_batches(n: int, m: int, flags: tuple[str, str] = ("--worst-n", "--worst-m")) -> None:
    """Refuse ``n`` images in batches of ``m`` unless 1 ≤ m ≤ n and m divides n."""
    nf, mf = flags
    if m < 1:
        raise ValueError(f"{mf} must be ≥ 1, got {m}")
    if m > n:
        raise ValueError(f"{mf} {m} exceeds {nf} {n}: a batch cannot hold more images than are measured")
    if n % m:
        raise ValueError(f"{nf} {n} is not a multiple of {mf} {m}; pass n = k·m (e.g. 1024 and 128)")


def batch_objectives(obj: DatasetObjective, n: int, m: int, logit_norm: bool = False,
                     flags: tuple[str, str] = ("--worst-n", "--worst-m")) -> list[DatasetObjective]:
    """Objectives of this rank's first images of the measured data in batches of ``m`` (BatchNorm eval, sums not
    reduced over ranks); in one process the first ``n`` images, under torchrun ⌈n / ranks⌉ of each rank's shard.
    ``flags``: how the refusals name ``n`` and ``m``."""
    nf = flags[0]
    check_batches(n, m, flags)
    if n > obj.count:
        raise ValueError(f"{nf} {n} exceeds the {obj.count} training images measured; pass --train-subset ≥ "
                         f"{n} or a smaller {nf}")
    xs = torch.cat([x for x, _ in obj.batches])
    ys = torch.cat([y for _, y in obj.batches])
    take = min(len(ys), -(-n // distributed.world_size()))
    take -= take % m
    out = []
    for start in range(0, take, m):
        data = FixedBatches([(xs[start:start + m], ys[start:start + m])], m, obj.device, obj.dtype, local=True)
        sub = DatasetObjective(NormalisedLogits(obj.model) if logit_norm else obj.model, data, bn="eval",
                               loss=obj.loss)
        if obj.observer is not None:  # the progress bar counts images
            sub.observer = lambda kind, parent=obj.observer, k=m: [parent(kind) for _ in range(k)]
        out.append(sub)
    return out


def _worst_case(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
                ) -> dict[str, Any]:
    subs = batch_objectives(obj, job["n"], job["m"], job.get("logit_norm", False))
    reduce = (lambda v: distributed.all_reduce_sum(torch.as_tensor(v, device=obj.device)).cpu().numpy()
              ) if distributed.world_size() > 1 else None
    r = worst_case_sharpness([s.value_and_grad for s in subs], x, job["rho"], m=job["m"], n=job["n"],
                             norm=job["norm"], adaptive=job["adaptive"], iterations=job["iterations"],
                             l2_step=job["l2_step"], reduce=reduce, loop=job.get("loop", "apgd"))
    return {"value": r.sharpness, **asdict(r), "bn_mode_used": "eval"}


WORST_N, WORST_M = 1024, 128  # the defaults of --worst-n and --worst-m where the measured images allow them


def worst_batches(n: int | None, m: int | None, measured: int | None) -> tuple[int, int]:
    """``(n, m)`` of a worst-case request: given values as given; a default (``None``) is 1,024 images in batches of
    128, or — when fewer training images are measured (``measured``, ``None`` when not known before the data is
    read) — every measured image, rounded down to a multiple of ``m``, in batches of at most ``m``. A default that
    does not fit the data is shrunk; a given value that does not fit is refused later, naming its flag.

    >>> worst_batches(None, None, 50_000), worst_batches(None, None, 300), worst_batches(None, None, 96)
    ((1024, 128), (256, 128), (96, 96))
    """
    if m is None:
        m = min(WORST_M, n if n is not None else (WORST_N if measured is None else min(WORST_N, measured)))
    if n is None:
        n = WORST_N if measured is None else min(WORST_N, measured)
        n -= n % m if m > 0 else 0
        n = n or m  # m exceeds every measured image: check_batches names --worst-m
    return n, m


def _worst_jobs(p: Mapping[str, Any]) -> list[Job]:
    if p["worst_rho"] <= 0:
        raise ValueError(f"--worst-rho must be > 0, got {p['worst_rho']}")
    n, m = worst_batches(p["worst_n"], p["worst_m"], p.get(MEASURED))
    p = {**p, "worst_n": n, "worst_m": m}
    check_batches(n, m)  # refused with the request, before any work
    kind = ("adaptive_" if p["worst_adaptive"] else "") + p["worst_norm"]
    step = "_authors" if p["worst_norm"] == "l2" and p["worst_l2_step"] == "authors" else ""
    check_choice("--worst-loop", p["worst_loop"], WorstLoop)
    extra = {"logit_norm": True} if p["worst_logit_norm"] else {}  # absent when off: earlier results still resume
    # the authors' loop (the default) keeps the plain name; results of the Auto-PGD paper's loop end in _apgd. The
    # loop is in every job, so a result computed before the choice existed (the apgd loop, no "loop") is redone.
    loop = "_apgd" if p["worst_loop"] == "apgd" else ""
    return [(f"worst_{kind}{step}{'_lognorm' if extra else ''}_rho{p['worst_rho']:g}_m{p['worst_m']}_n{p['worst_n']}"
             f"{loop}",
             {"rho": p["worst_rho"], "norm": p["worst_norm"], "adaptive": p["worst_adaptive"], "m": p["worst_m"],
              "n": p["worst_n"], "iterations": p["worst_iterations"], "l2_step": p["worst_l2_step"], **extra,
              "loop": p["worst_loop"]})]


def _pacbayes_jobs(p: Mapping[str, Any]) -> list[Job]:
    names = _chosen_measures(p, "pacbayes_measures", "pacbayes_init", PACBAYES_MEASURES, PACBAYES_NEEDS_INIT)
    if p["pacbayes_draws"] < 1 or p["pacbayes_depth"] < 1 or not 0 < p["pacbayes_drop"] < 1:
        raise ValueError("--pacbayes-draws and --pacbayes-depth must be ≥ 1 and --pacbayes-drop in (0, 1)")
    check_choice("--pacbayes-convention", p["pacbayes_convention"], PacBayesConvention)
    settings = {"init": p["pacbayes_init"] or "", "draws": p["pacbayes_draws"], "depth": p["pacbayes_depth"],
                "drop": p["pacbayes_drop"], "convention": p["pacbayes_convention"], "adjust": p["pacbayes_adjust"]}
    return [(n, {"measure": n, **settings}) for n in names]


def _pacbayes(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
              ) -> dict[str, Any]:
    t0 = time.perf_counter()
    settings = {k: job[k] for k in ("init", "draws", "depth", "drop", "convention", "adjust")}
    search = SigmaSearch(depth=job["depth"], draws=job["draws"], drop=job["drop"], convention=job["convention"])
    found = _once_per_point(obj, x, ("pacbayes", tuple(sorted(settings.items())), seed), lambda: pacbayes_measures(
        obj.model, obj.batches, obj.count, seed, _init_model(job["init"], obj.dtype), search, job["adjust"]))
    return {"value": found[job["measure"]], "sigma": found["sigma"], "sigma_mag": found["sigma_mag"],
            "accuracy": found["accuracy"], "seconds": time.perf_counter() - t0}


register(Metric(
    name="pacbayes", summary="Jiang et al.'s PAC-Bayes flatness measures: the noise σ (and the magnitude-aware σ′) "
    "that lowers the training accuracy by 0.1, by Dziugaite et al.'s bisection; BatchNorm folded",
    params=(
        Param("pacbayes_measures", tuple[str, ...], (), "which of them (default: all; the ones from "
              "initialisation only with --pacbayes-init)", default_text="all"),
        Param("pacbayes_init", str | None, None, "the initial weights' checkpoint, for pacbayes_init, "
              "pacbayes_mag_init and pacbayes_mag_orig", default_text="none"),
        Param("pacbayes_draws", int, 10, "Monte-Carlo draws per σ (evaluated together)"),
        Param("pacbayes_depth", int, 15, "bisection halvings of [0, 2]"),
        Param("pacbayes_drop", float, 0.1, "the training-accuracy drop σ is sought for (tolerance 0.01)"),
        Param("pacbayes_convention", PacBayesConvention, "paper", "noise N(0, σ²) as defined (paper), or with σ² as "
              "the standard deviation as Dziugaite et al.'s code draws it (authors)"),
        Param("pacbayes_adjust", bool, True, "report √(v/m) as Dziugaite et al. (m training samples)"),
    ),
    jobs=_pacbayes_jobs, compute=_pacbayes,
    cost=lambda job: {"f": 2 * job["depth"] * job["draws"] + 1},  # at most: two searches
    fields=("sigma", "sigma_mag", "accuracy", "seconds"),
))


def _alpha_jobs(p: Mapping[str, Any]) -> list[Job]:
    if p["alpha_depth"] < 1 or p["alpha_steps"] < 1 or not 0 < p["alpha_drop"] < 1:
        raise ValueError("--alpha-depth and --alpha-steps must be ≥ 1 and --alpha-drop in (0, 1)")
    return [("alpha_sharpness_mag", {"depth": p["alpha_depth"], "steps": p["alpha_steps"], "drop": p["alpha_drop"]})]


def _alpha_sharpness(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
                     ) -> dict[str, Any]:
    t0 = time.perf_counter()
    found = alpha_sharpness(obj.model, obj.batches, AlphaSearch(depth=job["depth"], steps=job["steps"],
                                                                drop=job["drop"]))
    return {**found, "seconds": time.perf_counter() - t0}


register(Metric(
    name="alpha_sharpness", summary="Jiang et al.'s magnitude-aware sharpness 1/α′² as PGDL's baseline computes it: "
    "the box |δ_i| ≤ α|w_i| whose worst case (a few sign-ascent steps) lowers the training accuracy by 0.1, found by "
    "bisection; BatchNorm folded",
    params=(
        Param("alpha_depth", int, 12, "bisection halvings of [0, 2]"),
        Param("alpha_steps", int, 5, "sign-gradient ascent steps per radius"),
        Param("alpha_drop", float, 0.1, "the training-accuracy drop α′ is sought for (tolerance 0.01)"),
    ),
    jobs=_alpha_jobs, compute=_alpha_sharpness,
    cost=lambda job: {"grad": job["depth"] * job["steps"], "f": job["depth"] + 1},
    fields=("alpha", "accuracy", "seconds"),
))


def _gradient_noise(obj: DatasetObjective, x: torch.Tensor, f0: float, job: Mapping[str, Any], seed: int
                    ) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = job["m"]
    n = obj.count - obj.count % m
    if n == 0:
        raise ValueError(f"--noise-batch {m} exceeds the {obj.count} training images measured")
    grads = torch.stack([s.value_and_grad(x)[1] for s in batch_objectives(obj, n, m, flags=("--train-subset",
                                                                                               "--noise-batch"))])
    count = distributed.all_reduce_sum(torch.tensor([float(len(grads))], device=grads.device))
    mean = distributed.all_reduce_sum(grads.sum(dim=0)) / count
    spread = distributed.all_reduce_sum(((grads - mean) ** 2).sum().reshape(1)) / count
    return {"value": float(spread), "batches": int(count), "grad_norm": float(mean.norm()),
            "seconds": time.perf_counter() - t0}


register(Metric(
    name="gradient_noise", summary="gradient noise (Jiang et al. 2020's optimisation measure): the mean over the "
    "measured images' batches of m of ‖g_b − ḡ‖², g_b a batch's mean-loss gradient, ḡ their mean; BatchNorm eval",
    params=(Param("noise_batch", int, 32, "images per batch m (the training batch size the noise is of)",
                  "samples"),),
    jobs=lambda p: [(f"gradient_noise_m{p['noise_batch']}", {"m": p["noise_batch"]})],
    compute=_gradient_noise, cost=lambda job: {"grad": 1},
    fields=("batches", "grad_norm", "seconds"),
))


register(Metric(
    name="worst_case", summary="adaptive worst-case m-sharpness by Auto-PGD (Andriushchenko et al. 2023): mean over "
    "batches of m images of max over the box/ellipsoid of the loss increase, BatchNorm eval",
    params=(
        Param("worst_rho", float, 0.002, "radius ρ of the box |δ_i| ≤ ρ|w_i| or the ellipsoid ‖δ ⊘ |w|‖ ≤ ρ "
              "(the authors' ResNet-18 grids: ℓ∞ 0.001–0.008, ℓ2 0.25–2)"),
        Param("worst_norm", WorstNorm, "linf", "ℓ∞ box or ℓ2 ellipsoid"),
        Param("worst_adaptive", bool, True, "scale the set by |w| (adaptive, invariant to ReLU rescaling); off: |w| "
              "→ 1"),
        Param("worst_m", int | None, None, "images per batch (m-sharpness)", "samples",
              default_text="128, or n when fewer images are measured"),
        Param("worst_n", int | None, None, "images measured (the first n of the training data measured)", "samples",
              default_text="1024, or every measured image (a multiple of m) when fewer"),
        Param("worst_iterations", int, 20, "Auto-PGD iterations per batch"),
        Param("worst_l2_step", L2Step, "invariant", "ℓ2 ascent step: normalised in the scaled coordinates "
              "(invariant), or g/‖g‖ ⊙ |w| with a Euclidean projection (the authors' code; not invariant)"),
        Param("worst_loop", WorstLoop, "authors", "the iteration: the authors' code's (tml-epfl/sharpness-vs-"
              "generalization, so numbers compare with the paper's tables: momentum 0.75·z + 0.25·x_{k−1}, checks one "
              "iteration later, halving moves only the gradient's point) or the Auto-PGD paper's (apgd; results end "
              "in _apgd)"),
        Param("worst_logit_norm", bool, False, "normalise each sample's logits to unit length before the loss "
              "(Andriushchenko et al.'s option: the measure ignores the scale of the last layer)"),
    ),
    jobs=_worst_jobs, compute=_worst_case,
    cost=lambda job: {"grad_image": (job["iterations"] + 1) * job["n"],
                      "apgd_iteration": job["iterations"] * (job["n"] // job["m"])},
    fields=("sharpness", "stderr", "batches", "m", "n", "rho", "norm", "adaptive", "l2_step", "iterations", "loop",
            "f0_mean", "f_max_mean", "seconds", "bn_mode_used"),
))

