"""Does a measure predict generalisation? The correlation scores of the field over a table of trained networks.

A table has one row per network: its hyper-parameters, its training and test accuracy (fractions, or percentages
when a column holds values above 1) and any number of measures. The generalisation gap is ``g = train_acc −
test_acc`` (Jiang et al. 2020; the PGDL competition). For each measure μ:

* **Kendall τ** (Jiang et al., eq. 2): τ = Σ_{i≠j} sign(μ_i − μ_j)·sign(g_i − g_j) / (n(n − 1)) — the τ-a of
  all ordered pairs, a tie counting 0.
* **Granulated Ψ** (Jiang et al., eq. 3): for hyper-parameter θ_k, ψ_k is the mean, over the cells of networks that
  share every other hyper-parameter (the seed included), of τ within the cell (cells of fewer than two networks
  left out); Ψ is the mean of the ψ_k.
* **Conditional mutual information** as the PGDL competition scored it: over all ordered pairs of networks (i = j
  included), the events V_g = [g_i > g_j] and V_μ = [μ_i > μ_j]; for a conditioning set S of hyper-parameters the
  pairs fall into cells by the two networks' values of S, and the score is (mean over cells of I(V_μ; V_g | cell)) /
  (mean over cells of H(V_g | cell)), entropies in bits with 1e-12 added inside the logarithm as they did; the
  reported value is the minimum over the conditioning sets of that size (|S| = 0, 1, 2; PGDL's own is |S| = 2).
  A measure equal to the gap scores 1 (to 1e-11), one that depends on a single hyper-parameter only scores 0 when
  conditioned on it. Cells no pair falls into are left out of the means (their ratio is undefined; PGDL's complete
  grids have none).
* **Robust sign error** (Dziugaite et al. 2020): every pair of networks whose hyper-parameters differ in exactly one
  (an environment is such a pair of configurations, over all their seeds) has the sign error (1 − sign(Δμ)·sign(Δg))/2
  weighted by w = (h − ½)₊ with h = (1 − 2·exp(−2n(|Δg|/2)²))₊², the Hoeffding probability that two gaps measured on n
  test images differ; an environment's error is its weighted mean, and environments of effective sample size
  (Σw)²/Σw² below 12 are dropped. Reported: the mean, the 90th percentile and the maximum over environments.

Bootstrap intervals of τ and Ψ resample the seeds (all networks of a drawn seed together) when the table has a seed
column. Rows that are not complete (status), that did not reach their training target (a zoo table's ``converged``
``no``), not finite, or above a training-loss bar are excluded and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NOT_MEASURES = frozenset({"run", "index", "status", "reason", "converged", "epochs", "steps", "train_loss",
                          "train_accuracy",
                          "test_loss", "test_accuracy", "train_acc", "test_acc", "seed", "gap"})
SEED_COLUMN = "seed"


@dataclass(frozen=True)
class Networks:
    """The networks a study scores: hyper-parameter values per column (strings: a value is a category), the gap,
    the measures (float arrays), and what was left out and why."""

    hparams: dict[str, list[str]]
    gap: np.ndarray
    measures: dict[str, np.ndarray]
    seeds: list[str] | None
    excluded: dict[str, int] = field(default_factory=dict)
    test_images: int | None = None

    @property
    def n(self) -> int:
        """The number of networks."""
        return len(self.gap)

    def take(self, rows: np.ndarray) -> Networks:
        """The networks ``rows`` only (a measure missing on some networks is scored on the others)."""
        return Networks({h: [v[i] for i in rows] for h, v in self.hparams.items()}, self.gap[rows],
                        {m: v[rows] for m, v in self.measures.items()},
                        [self.seeds[i] for i in rows] if self.seeds else None, self.excluded, self.test_images)


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_table(path: str | Path, hparams: Sequence[str] | None = None, measures: Sequence[str] | None = None,
               max_train_loss: float | None = None) -> Networks:
    """A CSV with one row per network (a zoo's ``runs.csv`` or any other): ``hparams`` (default: the columns between
    ``index`` and ``status`` of a zoo table, without ``seed``), the accuracies (``train_accuracy``/``test_accuracy``
    or ``train_acc``/``test_acc``), and ``measures`` (default: every other column with a number in some row). A
    ``ValueError`` in one line for a missing column or a table with fewer than three usable rows."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    columns = list(rows[0])
    acc = next(((t, s) for t, s in (("train_accuracy", "test_accuracy"), ("train_acc", "test_acc"))
                if t in columns and s in columns), None)
    if acc is None:
        raise ValueError(f"{path}: no train_accuracy/test_accuracy (or train_acc/test_acc) columns; it has {columns}")
    if hparams is None:
        if "index" in columns and "status" in columns:
            hparams = [c for c in columns[columns.index("index") + 1:columns.index("status")] if c != SEED_COLUMN]
        else:
            raise ValueError(f"{path} is not a zoo table: name the hyper-parameter columns with --hparams")
    missing = [c for c in hparams if c not in columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (hyper-parameters); it has {columns}")
    if measures is None:
        measures = [c for c in columns if c not in NOT_MEASURES and c not in hparams
                    and any(math.isfinite(_float(r[c])) for r in rows)]
    missing = [c for c in measures if c not in columns]
    if missing:
        raise ValueError(f"{path}: no measure column(s) {missing}; it has {columns}")
    excluded: dict[str, int] = {}
    kept = []
    for r in rows:
        why = None
        if "status" in r and r["status"] not in ("complete", ""):
            why = f"status {r['status']}"
        elif r.get("converged") == "no":  # a zoo run that did not reach its training target (Jiang et al.'s protocol)
            why = "not converged to its training target"
        elif max_train_loss is not None and not _float(r.get("train_loss")) <= max_train_loss:
            why = f"training loss above {max_train_loss:g}"
        elif not all(math.isfinite(_float(r[c])) for c in acc):
            why = "a missing or non-finite accuracy"
        if why is None:
            kept.append(r)
        else:
            excluded[why] = excluded.get(why, 0) + 1
    if len(kept) < 3:
        raise ValueError(f"{path}: {len(kept)} usable row(s) of {len(rows)} (excluded: {excluded or 'none'}); "
                         "a correlation needs at least 3")
    train = np.array([_float(r[acc[0]]) for r in kept])
    test = np.array([_float(r[acc[1]]) for r in kept])
    scale = 100.0 if max(train.max(), test.max()) > 1.0 else 1.0  # percentages → fractions
    return Networks(hparams={h: [str(r[h]) for r in kept] for h in hparams}, gap=(train - test) / scale,
                    measures={m: np.array([_float(r[m]) for r in kept]) for m in measures},
                    seeds=[str(r[SEED_COLUMN]) for r in kept] if SEED_COLUMN in columns else None,
                    excluded=excluded)


def kendall_tau(measure: np.ndarray, gap: np.ndarray) -> float:
    """Jiang et al.'s τ: the mean of sign(Δμ)·sign(Δg) over ordered pairs i ≠ j (τ-a; NaN for fewer than 2)."""
    n = len(gap)
    if n < 2:
        return math.nan
    dm = np.sign(measure[:, None] - measure[None, :])
    dg = np.sign(gap[:, None] - gap[None, :])
    return float((dm * dg).sum() / (n * (n - 1)))


def _cells(keys: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], list[int]]:
    cells: dict[tuple[str, ...], list[int]] = {}
    for i, k in enumerate(keys):
        cells.setdefault(k, []).append(i)
    return cells


def granulated(nets: Networks, measure: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, dict[str, float]]:
    """(Ψ, {θ_k: ψ_k}) of ``measure`` over the networks ``rows`` (default all). A hyper-parameter with no cell of
    two networks has ψ = NaN and is left out of Ψ."""
    rows = np.arange(nets.n) if rows is None else rows
    psi: dict[str, float] = {}
    for k in nets.hparams:
        others = [h for h in nets.hparams if h != k]
        keys = [tuple(nets.hparams[h][i] for h in others) + ((nets.seeds[i],) if nets.seeds else ()) for i in rows]
        taus = [kendall_tau(measure[rows[idx]], nets.gap[rows[idx]])
                for idx in _cells(keys).values() if len(idx) >= 2]
        taus = [t for t in taus if math.isfinite(t)]
        psi[k] = float(np.mean(taus)) if taus else math.nan
    finite = [v for v in psi.values() if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), psi


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-np.sum(p * np.log2(p + 1e-12)))


def _mutual_information(table: np.ndarray) -> float:
    total = table.sum()
    rows, cols = table.sum(axis=1) / total, table.sum(axis=0) / total
    mi = 0.0
    for i in range(2):
        for j in range(2):
            joint = table[i, j] / total
            if joint > 0:
                mi += joint * math.log2(joint / (rows[i] * cols[j]))
    return mi


def conditional_mi(nets: Networks, measure: np.ndarray, size: int) -> float:
    """The PGDL score with conditioning sets of ``size`` hyper-parameters: the minimum over the sets (ordered pairs
    of distinct hyper-parameters for size 2, as PGDL loops them) of mean I(V_μ; V_g | cell) / mean H(V_g | cell); NaN
    when the table has fewer than ``size`` hyper-parameters."""
    names = list(nets.hparams)
    if len(names) < size:
        return math.nan
    g_pos = (nets.gap[:, None] > nets.gap[None, :]).ravel()
    m_pos = (measure[:, None] > measure[None, :]).ravel()
    sets = [()] if size == 0 else list(itertools.permutations(names, size))
    best = math.inf
    for chosen in sets:
        keys = np.zeros(nets.n ** 2, dtype=np.int64)
        for h in chosen:  # the two networks' values of each chosen hyper-parameter, as one integer per pair
            _, code = np.unique(np.asarray(nets.hparams[h]), return_inverse=True)
            k = int(code.max()) + 1
            keys = keys * k * k + (code[:, None] * k + code[None, :]).ravel()
        mis, hs = [], []
        for key in np.unique(keys):
            sel = keys == key
            table = np.zeros((2, 2))
            np.add.at(table, ((~g_pos[sel]).astype(int), (~m_pos[sel]).astype(int)), 1)
            mis.append(_mutual_information(table))
            hs.append(_entropy(table.sum(axis=1)))
        denominator = float(np.mean(hs))
        score = float(np.mean(mis)) / denominator if denominator > 0 else math.nan
        best = min(best, score) if math.isfinite(score) else best
    return best if math.isfinite(best) else math.nan


def hoeffding_weight(delta_gap: float, n: int) -> float:
    """Dziugaite et al.'s weight of a pair whose gaps, each measured on ``n`` test images, differ by ``delta_gap``:
    the probability bound h = (1 − 2·exp(−2n(|Δg|/2)²))₊², minus ½, clipped at 0."""
    h = max(0.0, 1.0 - 2.0 * math.exp(-2.0 * n * (abs(delta_gap) / 2.0) ** 2)) ** 2
    return max(h - 0.5, 0.0)


def environments(nets: Networks) -> int:
    """The number of environments: ordered pairs of configurations that differ in exactly one hyper-parameter."""
    configs = list(_cells([tuple(nets.hparams[h][i] for h in nets.hparams) for i in range(nets.n)]))
    return sum(sum(x != y for x, y in zip(a, b, strict=True)) == 1 for a, b in itertools.permutations(configs, 2))


def robust_sign_errors(nets: Networks, measure: np.ndarray, test_images: int, min_ess: float = 12.0
                       ) -> np.ndarray:
    """The weighted sign error of every environment (a pair of configurations differing in exactly one
    hyper-parameter, over all their networks) with effective sample size ≥ ``min_ess`` (of :func:`environments`)."""
    configs = [tuple(nets.hparams[h][i] for h in nets.hparams) for i in range(nets.n)]
    by_config = _cells(configs)
    errors = []
    for a, b in itertools.permutations(by_config, 2):
        if sum(x != y for x, y in zip(a, b, strict=True)) != 1:
            continue
        w_sum = w_sq = loss = 0.0
        for i in by_config[a]:
            for j in by_config[b]:
                w = hoeffding_weight(nets.gap[i] - nets.gap[j], test_images)
                sign = float(np.sign(measure[i] - measure[j]) * np.sign(nets.gap[i] - nets.gap[j]))
                loss += w * (1.0 - sign) / 2.0
                w_sum, w_sq = w_sum + w, w_sq + w * w
        if w_sq > 0 and w_sum ** 2 / w_sq >= min_ess:
            errors.append(loss / w_sum)
    return np.asarray(errors)


def _bootstrap(nets: Networks, measure: np.ndarray, draws: int, seed: int) -> dict[str, tuple[float, float]]:
    """95 % intervals of τ and Ψ when the seeds (each with all its networks) are resampled with replacement."""
    if not nets.seeds or len(set(nets.seeds)) < 2 or draws <= 0:
        return {}
    groups = _cells([(s,) for s in nets.seeds])
    names = list(groups)
    rng = np.random.default_rng(seed)
    taus, psis = [], []
    for _ in range(draws):
        drawn = [groups[names[k]] for k in rng.integers(0, len(names), len(names))]
        rows = np.concatenate(drawn)
        taus.append(kendall_tau(measure[rows], nets.gap[rows]))
        # a seed drawn twice is two seeds: its copies never share a Ψ cell
        labels = [str(d) for d, idx in enumerate(drawn) for _ in idx]
        resampled = dataclasses.replace(nets.take(rows), seeds=labels)
        psis.append(granulated(resampled, measure[rows])[0])

    def interval(values: list[float]) -> tuple[float, float]:
        v = np.asarray([x for x in values if math.isfinite(x)])
        return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v.size else (math.nan, math.nan)

    return {"kendall_tau": interval(taus), "psi": interval(psis)}


def score(nets: Networks, test_images: int | None = None, min_ess: float = 12.0, bootstrap: int = 200,
          seed: int = 0) -> list[dict[str, Any]]:
    """One row per measure: ``kendall_tau``, ``psi`` and ``psi_<θ>``, ``cmi`` (|S| = 2) and ``cmi_s0``/``cmi_s1``,
    the robust sign errors (``sign_error_mean``/``_p90``/``_max`` and ``environments``; with ``test_images``), and
    bootstrap intervals (``*_lo``/``*_hi``)."""
    out = []
    for name, values in nets.measures.items():
        finite = np.flatnonzero(np.isfinite(values))  # a measure missing on a network (a loss never reached) skips it
        if len(finite) < 3:
            out.append({"measure": name, "networks": len(finite)})
            continue
        sub = nets if len(finite) == nets.n else nets.take(finite)
        out.append(_score_one(sub, name, sub.measures[name], test_images, min_ess, bootstrap, seed))
    return out


def _score_one(nets: Networks, name: str, mu: np.ndarray, test_images: int | None, min_ess: float, bootstrap: int,
           seed: int) -> dict[str, Any]:
    """The scores of one measure over networks that all have it."""
    psi, per = granulated(nets, mu)
    row: dict[str, Any] = {"measure": name, "networks": nets.n, "kendall_tau": kendall_tau(mu, nets.gap),
                           "psi": psi, **{f"psi_{k}": v for k, v in per.items()},
                           "cmi": conditional_mi(nets, mu, 2), "cmi_s0": conditional_mi(nets, mu, 0),
                           "cmi_s1": conditional_mi(nets, mu, 1)}
    if test_images:
        errors = robust_sign_errors(nets, mu, test_images, min_ess)
        row.update(environments=int(errors.size), environments_all=environments(nets),
                   sign_error_mean=float(errors.mean()) if errors.size else math.nan,
                   sign_error_p90=float(np.percentile(errors, 90)) if errors.size else math.nan,
                   sign_error_max=float(errors.max()) if errors.size else math.nan)
    for key, (lo, hi) in _bootstrap(nets, mu, bootstrap, seed).items():
        row[f"{key}_lo"], row[f"{key}_hi"] = lo, hi
    return row


def write_scores(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The scores as CSV, one row per measure, every digit kept."""
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return path
