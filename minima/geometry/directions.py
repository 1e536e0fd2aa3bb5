"""Parameter-space geometry: θ(α) on a segment, θ + α·d along a direction, planes θ0 + x·d1 + y·d2, and the
directions that span them (random filter-normalised, through three checkpoints, PCA of a training trajectory).

Only floating-point entries of a state dict are moved; integer buffers (``num_batches_tracked``) are
taken from the base point, never interpolated. Arithmetic is done in float64 and cast back to each
entry's dtype, and the segment uses ``(1 − α)·θ_A + α·θ_B`` so that α = 0 and α = 1 give θ_A and θ_B
*exactly*; a plane's origin (x, y) = (0, 0) is its base point exactly.

**Normalisation of random directions** (Li et al. 2018, §4): a Gaussian d is rescaled per filter — one output
row of a conv/linear weight — to the norm of the matching filter of θ (``filter``), per tensor (``layer``), or
not at all (``none``). One-dimensional parameters (biases, BatchNorm scale/shift) get a zero direction with
``ignore="bn-and-bias"`` (their default) or a copy of θ with ``ignore="none"`` (as their code does).
BatchNorm running statistics always get a zero direction from a random plane; their fate at each point is the
BatchNorm policy's.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from minima.core.vocab import Ignore, Norm

StateDict = dict[str, torch.Tensor]
NORMS: tuple[str, ...] = typing.get_args(Norm)


class DirectionError(ValueError):
    """Directions that cannot span what was asked for (collinear checkpoints, too short a trajectory, …)."""


def bn_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of BatchNorm running statistics (``running_mean``/``running_var``)."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            names.update(f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var"))
    return names


def lerp_state(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    """θ(α) = (1 − α)·θ_A + α·θ_B for floating entries (float64 arithmetic); other entries from A."""
    out = {}
    for key, ta in a.items():
        if ta.is_floating_point():
            mixed = (1.0 - alpha) * ta.to(torch.float64) + alpha * b[key].to(torch.float64)
            out[key] = mixed.to(ta.dtype)
        else:
            out[key] = ta.clone()
    return out


def shift_state(base: StateDict, direction: StateDict, alpha: float) -> StateDict:
    """θ + α·d for floating entries present in ``direction``; everything else copied from ``base``."""
    return combine_state(base, [(alpha, direction)])


def combine_state(base: StateDict, terms: Sequence[tuple[float, StateDict]]) -> StateDict:
    """θ + Σ_k c_k·d_k (float64 arithmetic, cast back) for floating entries of ``base``; an entry missing from a
    direction counts as zero there; non-floating entries copied from ``base``."""
    out = {}
    for key, t in base.items():
        moving = [(c, d[key]) for c, d in terms if key in d]
        if t.is_floating_point() and moving:
            acc = t.to(torch.float64)
            for c, d in moving:
                acc = acc + c * d.to(torch.float64)
            out[key] = acc.to(t.dtype)
        else:
            out[key] = t.clone()
    return out


def random_direction(model: nn.Module, state: StateDict, seed: int, norm: Norm = "filter",
                     ignore: Ignore = "bn-and-bias") -> StateDict:
    """A seeded Gaussian direction over the trainable parameters of ``model`` at ``state``, normalised as in
    Li et al. (2018): see the module notes for ``norm`` and ``ignore``. Float64 tensors keyed like ``state``."""
    if norm not in NORMS:
        raise DirectionError(f"unknown normalisation {norm!r}; choose one of {list(NORMS)}")
    gen = torch.Generator().manual_seed(seed)
    direction: StateDict = {}
    for name, p in model.named_parameters():
        theta = state[name].to(torch.float64)
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(theta) if ignore == "bn-and-bias" else theta.clone()
            continue
        d = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        if norm == "filter":
            d_flat, t_flat = d.reshape(d.shape[0], -1), theta.reshape(theta.shape[0], -1)
            scale = t_flat.norm(dim=1) / d_flat.norm(dim=1).clamp_min(1e-30)
            d = (d_flat * scale[:, None]).reshape(theta.shape)
        elif norm == "layer":
            d = d * (theta.norm() / d.norm().clamp_min(1e-30))
        direction[name] = d
    return direction


def negative_variance_channels(state: StateDict, bn_names: set[str]) -> int:
    """Number of BatchNorm channels whose running variance is negative (an interpolation artefact:
    (1 − α)·v_A + α·v_B < 0 for α outside [0, 1]); evaluating with them gives NaN activations."""
    return int(sum(int((state[k] < 0).sum()) for k in bn_names if k.endswith("running_var")))


# ------------------------------------------------------------------------------------------------- planes
@dataclass(frozen=True)
class Plane:
    """θ(x, y) = origin + x·d1 + y·d2, with where its named points lie and how its directions were made.

    ``marks``: name → (x, y) of points that belong on the figures (the checkpoints); ``path``: (n, 2) coordinates of
    a projected trajectory, if any; ``provenance``: JSON-able description (kind, seeds or sha256, normalisation,
    explained variance …)."""

    origin: StateDict
    d1: StateDict
    d2: StateDict
    provenance: dict[str, Any]
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)
    path: np.ndarray | None = None

    def point(self, x: float, y: float) -> StateDict:
        """The state dict at (x, y)."""
        return combine_state(self.origin, [(x, self.d1), (y, self.d2)])


def _flat(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in keys])


def _unflat(vector: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> StateDict:
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[offset : offset + n].view(like[k].shape).clone()
        offset += n
    return out


def random_plane(model: nn.Module, state: StateDict, seed: int, norm: Norm = "filter",
                 ignore: Ignore = "bn-and-bias", name: str = "origin") -> Plane:
    """The plane through ``state`` spanned by two independent random directions (seeds ``seed`` and ``seed + 1``),
    each normalised as :func:`random_direction`; the checkpoint, marked ``name``, sits at (0, 0)."""
    d1 = random_direction(model, state, seed, norm, ignore)
    d2 = random_direction(model, state, seed + 1, norm, ignore)
    return Plane(origin=state, d1=d1, d2=d2, marks={name: (0.0, 0.0)},
                 provenance={"kind": "random", "seeds": [seed, seed + 1], "norm": norm, "ignore": ignore})


def checkpoint_plane(states: Sequence[StateDict], names: Sequence[str], rel_tol: float = 1e-6) -> Plane:
    """The affine plane through three state dicts A, B, C (every floating entry, BatchNorm statistics included):
    origin A, d1 = B − A, d2 = the part of C − A orthogonal to d1, rescaled to ‖B − A‖ (Gram–Schmidt), so the
    coordinates are in units of ‖B − A‖: A = (0, 0), B = (1, 0), C = (c_x, c_y) with c_y > 0.

    Raises :class:`DirectionError` when the three are (numerically) collinear: ‖(C − A)⊥‖ ≤ ``rel_tol``·‖C − A‖."""
    if len(states) != 3:
        raise DirectionError(f"a plane through checkpoints needs exactly three; got {len(states)}")
    a, b, c = states
    keys = [k for k, t in a.items() if t.is_floating_point()]
    u = _flat(b, keys) - _flat(a, keys)
    v = _flat(c, keys) - _flat(a, keys)
    nu = float(u.norm())
    if nu == 0.0:
        raise DirectionError(f"{names[0]} and {names[1]} hold the same weights; pass three different checkpoints")
    e1 = u / nu
    along = float(v @ e1)
    perp = v - along * e1
    npv = float(perp.norm())
    if npv <= rel_tol * max(float(v.norm()), 1e-300):
        raise DirectionError(f"{names[0]}, {names[1]} and {names[2]} are collinear in weight space (the part of "
                             f"{names[2]} − {names[0]} off the line is {npv:.3g}, of {float(v.norm()):.3g}); no plane "
                             "passes through them — use the segment command (python -m minima.interpolate) or "
                             "another third checkpoint")
    d1 = _unflat(u, a, keys)
    d2 = _unflat(perp * (nu / npv), a, keys)
    marks = {names[0]: (0.0, 0.0), names[1]: (1.0, 0.0), names[2]: (along / nu, npv / nu)}
    return Plane(origin=a, d1=d1, d2=d2, marks=marks,
                 provenance={"kind": "checkpoints", "norm": "none", "unit": "‖B − A‖", "norm_b_minus_a": nu})


def trajectory_plane(states: Sequence[StateDict], names: Sequence[str], parameter_names: Sequence[str]) -> Plane:
    """The plane through the last state of a training trajectory spanned by the first two principal directions of
    the differences {θ_i − θ_last} over ``parameter_names`` (Li et al. 2018, §7): the top two right singular vectors
    of the matrix of differences. The differences are *not* centred (sklearn's PCA, which Li et al. call, would
    centre them): the plane is fitted through θ_last itself, so with three checkpoints it is the plane through all
    three, and a trajectory that lies in a plane through θ_last is reproduced exactly by its projection.

    d1, d2 are orthonormal; the trajectory's coordinates are the projections (θ_i − θ_last)·d_k; the shares of the
    differences' sum of squares the two directions carry are recorded (``explained_variance_ratio``). Needs at
    least three states."""
    if len(states) < 3:
        raise DirectionError(f"a trajectory plane needs at least 3 checkpoints (PCA of ≥ 2 differences); got "
                             f"{len(states)} — save more with minima.train --save-every 1")
    last = states[-1]
    keys = list(parameter_names)
    end = _flat(last, keys)
    diffs = torch.stack([_flat(s, keys) - end for s in states[:-1]])
    _, sing, vt = torch.linalg.svd(diffs, full_matrices=False)
    if len(sing) < 2 or float(sing[1]) <= 1e-12 * max(float(sing[0]), 1e-300):
        raise DirectionError("the trajectory's differences span fewer than two directions; PCA finds no plane")
    basis = vt[:2]
    for k in range(2):  # a fixed sign: the first checkpoint lies at negative x / y ≤ 0 (deterministic figures)
        if float(diffs[0] @ basis[k]) > 0:
            basis[k] = -basis[k]
    total = float((sing**2).sum())
    path = torch.cat([diffs @ basis.T, torch.zeros(1, 2, dtype=torch.float64)]).numpy()
    d1, d2 = _unflat(basis[0], last, keys), _unflat(basis[1], last, keys)
    marks = {names[0]: (float(path[0, 0]), float(path[0, 1])), names[-1]: (0.0, 0.0)}
    return Plane(origin=last, d1=d1, d2=d2, marks=marks, path=path, provenance={
        "kind": "trajectory", "norm": "orthonormal (PCA)", "checkpoints": list(names),
        "explained_variance_ratio": [float(sing[0] ** 2 / total), float(sing[1] ** 2 / total)]})
