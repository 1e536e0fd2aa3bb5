"""Barriers along a line between two minima: how far the loss rises above (and the accuracy falls below) the
straight interpolation of the endpoints' values.

For loss L along θ(α) = (1 − α)·θ_A + α·θ_B the loss barrier is max_α [L(α) − ((1 − α)·L(0) + α·L(1))] over the grid's
α in [0, 1] (Frankle et al. 2020, Entezari et al. 2022), and the accuracy barrier max_α [((1 − α)·acc(0) + α·acc(1))
− acc(α)]; each with the α where it occurs. Both need α = 0 and α = 1 on the grid; points not computed or not finite
are left out. A barrier near 0 means the endpoints are linearly connected on that split.
"""

from __future__ import annotations

import numpy as np

from minima.files.results import Curve

SPLITS = ("train", "test")


def barriers(curve: Curve) -> dict[str, float]:
    """``barrier_<split>_loss``, ``barrier_<split>_loss_alpha``, ``barrier_<split>_accuracy``,
    ``barrier_<split>_accuracy_alpha`` for train and test; empty when α = 0 or α = 1 is not on the grid (or not
    computed)."""
    alpha = np.asarray(curve.alpha, dtype=np.float64)
    ends = [np.flatnonzero(alpha == a) for a in (0.0, 1.0)]
    if not all(len(e) for e in ends):
        return {}
    i0, i1 = int(ends[0][0]), int(ends[1][0])
    out: dict[str, float] = {}
    for split in SPLITS:
        for field, sign in (("loss", 1.0), ("accuracy", -1.0)):
            values = np.asarray(getattr(curve, f"{split}_{field}"), dtype=np.float64)
            line = (1 - alpha) * values[i0] + alpha * values[i1]
            gap = sign * (values - line)  # above the line for the loss, below it for the accuracy
            inside = (alpha >= 0) & (alpha <= 1) & np.isfinite(gap)
            if not inside.any():
                return {}
            k = int(np.flatnonzero(inside)[np.argmax(gap[inside])])
            out[f"barrier_{split}_{field}"] = float(gap[k]) + 0.0  # never "-0": the endpoints give 0
            out[f"barrier_{split}_{field}_alpha"] = float(alpha[k])
    return out


def describe(found: dict[str, float]) -> str:
    """The barriers as one line (empty when there are none)."""
    if not found:
        return ""
    def one(split: str, field: str) -> str:
        key = f"barrier_{split}_{field}"
        return f"{split} {field} {found[key]:.4g} at α = {found[key + '_alpha']:.3g}"

    return "barriers (max over α ∈ [0, 1] against the straight line of the endpoints): " + "; ".join(
        f"{one(split, 'loss')}, {one(split, 'accuracy')}" for split in SPLITS)
