"""Finding the permutation of B's hidden units that best matches A's: weight matching and activation matching.

**Weight matching** (Ainsworth, Hayase, Srinivasa, ICLR 2023, Algorithm 1) maximises
L(π) = Σ_W ⟨W_A, π(W_B)⟩ over every parameter tensor (weights, biases, normalisation scales and shifts; running
statistics are moved but not matched) by coordinate ascent: for one group at a time, with every other group's
permutation held fixed, L is linear in that group's permutation, C[i, j] = Σ over the tensor axes the group moves
⟨row i of W_A, row j of W_B with its other axes permuted⟩, and the best permutation is a linear assignment
(``scipy.optimize.linear_sum_assignment(C, maximize=True)``). Groups are visited in a seeded random order, sweeps
repeat until no group improves (or ``max_sweeps``). A group's permutation is changed only when its assignment
raises L, so L never decreases from sweep to sweep.

**Activation matching** (Git Re-Basin §3.1; Jordan et al., REPAIR, 2023) correlates, on a data subset, the values
of each group's units where they enter the next layers (after activation and pooling; over images and spatial
positions) between A and B, and assigns B's units to A's by maximising the summed Pearson correlation. The
correlations are accumulated in float64 over batches; a unit that is constant on the subset correlates 0 with
every other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import fx, nn

from minima.data import Split
from minima.geometry.directions import StateDict
from minima.geometry.evaluate import Batching
from minima.geometry.permute import PermutationSpec, expand, traced


@dataclass
class Matching:
    """The permutations found (``perms[group]``: new unit i of B = old unit perm[i]), the objective before (B as it
    is) and after, and its value after every sweep (weight matching) for inspection."""

    method: str
    perms: dict[str, np.ndarray]
    objective_before: float
    objective_after: float
    objective_name: str
    history: list[float] = field(default_factory=list)
    sweeps: int = 0


def _permuted_except(t: torch.Tensor, key: str, skip_axis: int, spec_axes: dict[str, list[tuple[int, str, int]]],
                     perms: dict[str, np.ndarray]) -> torch.Tensor:
    for axis, group, repeat in spec_axes.get(key, ()):
        if axis != skip_axis:
            t = t.index_select(axis, expand(perms[group], repeat))
    return t


def _axes_by_key(spec: PermutationSpec) -> dict[str, list[tuple[int, str, int]]]:
    out: dict[str, list[tuple[int, str, int]]] = {}
    for g in spec.groups:
        for ax in g.axes:
            out.setdefault(ax.key, []).append((ax.axis, g.name, ax.repeat))
    return out


def weight_objective(state_a: StateDict, state_b: StateDict, spec: PermutationSpec,
                     perms: dict[str, np.ndarray]) -> float:
    """L(π) = Σ over the parameters any group moves of ⟨W_A, π(W_B)⟩, in float64."""
    by_key = _axes_by_key(spec)
    total = 0.0
    for key in sorted(by_key):
        if key not in spec.parameters:
            continue
        b = _permuted_except(state_b[key].double(), key, -1, by_key, perms)
        total += float((state_a[key].double() * b).sum())
    return total


def weight_matching(state_a: StateDict, state_b: StateDict, spec: PermutationSpec, seed: int = 0,
                    max_sweeps: int = 100) -> Matching:
    """Ainsworth et al.'s weight matching of B to A (see the module docstring)."""
    by_key = _axes_by_key(spec)
    a = {k: v.detach().double().cpu() for k, v in state_a.items() if k in by_key}
    b = {k: v.detach().double().cpu() for k, v in state_b.items() if k in by_key}
    perms = spec.identity()
    rng = np.random.default_rng(seed)
    before = weight_objective(a, b, spec, perms)
    history = [before]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is reported
        improved = False
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            cost = np.zeros((g.size, g.size))
            for ax in g.axes:
                if ax.key not in spec.parameters:
                    continue
                wa = a[ax.key].movedim(ax.axis, 0).reshape(g.size, -1)
                wb = _permuted_except(b[ax.key], ax.key, ax.axis, by_key, perms).movedim(ax.axis, 0)
                cost += (wa @ wb.reshape(g.size, -1).T).numpy()
            _, col = linear_sum_assignment(cost, maximize=True)
            old = cost[np.arange(g.size), perms[g.name]].sum()
            new = cost[np.arange(g.size), col].sum()
            if new > old + 1e-12 * max(abs(old), 1.0):
                perms[g.name] = col
                improved = True
        history.append(weight_objective(a, b, spec, perms))
        if not improved:
            break
    return Matching("weights", perms, before, history[-1], "sum of <W_A, pi(W_B)> over parameters", history, sweeps)


class _Recorder(fx.Interpreter):
    """Runs a traced model and hands the values of the named nodes to ``sink``."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) → (N·∏spatial, C) in float64: one row per image and position."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double()


@dataclass
class _Moments:
    n: int = 0
    sa: torch.Tensor | None = None
    sb: torch.Tensor | None = None
    saa: torch.Tensor | None = None
    sbb: torch.Tensor | None = None
    sab: torch.Tensor | None = None

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        parts = (xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), xa.T @ xb)
        if self.sa is None:
            self.sa, self.sb, self.saa, self.sbb, self.sab = parts
        else:
            self.sa, self.sb, self.saa, self.sbb, self.sab = (
                s + p for s, p in zip((self.sa, self.sb, self.saa, self.sbb, self.sab), parts, strict=True))
        self.n += xa.shape[0]

    def correlation(self) -> torch.Tensor:
        assert self.sa is not None and self.sb is not None and self.saa is not None and self.sbb is not None
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - ma[:, None] * mb[None, :]
        va = (self.saa / self.n - ma * ma).clamp_min(0)
        vb = (self.sbb / self.n - mb * mb).clamp_min(0)
        denom = torch.sqrt(va[:, None] * vb[None, :])
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def unit_correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, split: Split,
                      mean: tuple[float, ...], std: tuple[float, ...], feed: Batching) -> dict[str, np.ndarray]:
    """Per group, the Pearson correlation matrix C[i, j] of A's unit i and B's unit j on ``split`` (eval mode),
    summed over the group's probe nodes. The models' modes are left as they were."""
    names = {p for g in spec.groups for p in g.probes}
    rec_a, rec_b = _Recorder(traced(model_a), names), _Recorder(traced(model_b), names)
    moments = {p: _Moments() for p in names}
    modes = {m: m.training for m in (*model_a.modules(), *model_b.modules())}
    model_a.eval()
    model_b.eval()
    try:
        with torch.inference_mode():
            for x, _ in feed.batches(split, mean, std):
                rec_a.run(x)
                rec_b.run(x)
                for p in names:
                    moments[p].add(_unit_columns(rec_a.values[p]).cpu(), _unit_columns(rec_b.values[p]).cpu())
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return {g.name: sum(moments[p].correlation() for p in g.probes).numpy() for g in spec.groups}


def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, split: Split,
                        mean: tuple[float, ...], std: tuple[float, ...], feed: Batching) -> Matching:
    """Assign B's units to A's by the largest summed correlation of their activations on ``split``; the objective
    is the mean correlation of matched units over all groups (before: B as it is)."""
    corr = unit_correlations(model_a, model_b, spec, split, mean, std, feed)
    perms, before, after, units = {}, 0.0, 0.0, 0
    for g in spec.groups:
        c = corr[g.name] / max(len(g.probes), 1)
        _, col = linear_sum_assignment(c, maximize=True)
        perms[g.name] = col
        before += float(np.trace(c))
        after += float(c[np.arange(g.size), col].sum())
        units += g.size
    return Matching("activations", perms, before / max(units, 1), after / max(units, 1),
                    "mean correlation of matched units", [before / max(units, 1), after / max(units, 1)], 1)
