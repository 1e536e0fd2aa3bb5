"""Curves between two minima (Garipov et al. NeurIPS 2018): θ(t) = Σ_i c_i(t)·θ_i for t ∈ [0, 1], with the
endpoints θ_0 = A and θ_{n+1} = B fixed and the bends θ_1 … θ_n trained.

* ``bezier``: the Bernstein polynomials of degree n + 1, c_i(t) = C(n+1, i)·tⁱ·(1 − t)^(n+1−i); one bend is Garipov's
  quadratic Bézier curve (1 − t)²·A + 2t(1 − t)·θ_1 + t²·B.
* ``polychain``: straight segments through the bends placed at t = i/(n + 1); no bend is the straight line.

Both give θ(0) = A and θ(1) = B exactly (c(0) = e_0, c(1) = e_{n+1}) and Σ_i c_i(t) = 1. Bends start on the segment
(bend i at the point of the line with α = i/(n + 1)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from minima.core.vocab import CurveKind, check_choice
from minima.geometry.directions import StateDict, lerp_state


def coefficients(kind: CurveKind, bends: int, t: float) -> list[float]:
    """c_0(t) … c_{bends+1}(t) (see the module docstring)."""
    check_choice("curve", kind, CurveKind)
    if bends < 0:
        raise ValueError(f"a curve has at least 0 bends, got {bends}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t} is outside [0, 1]")
    n = bends + 1
    if kind == "bezier":
        return [math.comb(n, i) * t**i * (1.0 - t) ** (n - i) for i in range(n + 1)]
    out = [0.0] * (n + 1)
    seg = min(int(t * n), n - 1)  # the segment [seg/n, (seg+1)/n] holding t
    local = t * n - seg
    out[seg], out[seg + 1] = 1.0 - local, local
    return out


def initial_bends(state_a: StateDict, state_b: StateDict, bends: int) -> list[StateDict]:
    """The bends on the segment: bend i at α = i/(bends + 1)."""
    return [lerp_state(state_a, state_b, i / (bends + 1)) for i in range(1, bends + 1)]


def combine(points: Sequence[dict[str, torch.Tensor]], coeffs: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i coeffs[i]·points[i] for every floating entry (differentiable; in the entries' dtype), non-floating
    entries (BatchNorm's batch counters) from the point of the largest coefficient. Entries with a zero coefficient
    are skipped, so an endpoint is reproduced exactly."""
    out = {}
    heaviest = points[max(range(len(coeffs)), key=lambda i: coeffs[i])]
    for key, first in points[0].items():
        if not first.is_floating_point():
            out[key] = heaviest[key]
            continue
        terms = [c * p[key] for c, p in zip(coeffs, points, strict=True) if c != 0.0]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        out[key] = total
    return out


def point_on_curve(points: Sequence[StateDict], kind: CurveKind, t: float) -> StateDict:
    """θ(t) of the curve through ``points`` (A, the bends, B) as a state dict, accumulated in float64 and stored in
    the points' dtypes; θ(0) = A and θ(1) = B exactly."""
    coeffs = coefficients(kind, len(points) - 2, t)
    wide = [{k: (v.double() if v.is_floating_point() else v) for k, v in p.items()} for p in points]
    mixed = combine(wide, coeffs)
    return {k: (v.to(points[0][k].dtype) if v.is_floating_point() else v.clone()) for k, v in mixed.items()}
