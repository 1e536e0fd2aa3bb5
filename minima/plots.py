"""Figures from result files only — plotting never computes a metric and never imports a model.

:func:`plot_curve` draws a Keskar-style parametric plot into a given or new axes (pyplot, for notebooks);
:func:`save_curve_figure` writes one to a file through a bare :class:`matplotlib.figure.Figure`, so it needs no
pyplot state and leaves matplotlib's backend and global settings as they are (the command ``python -m minima.plot``
chooses a non-interactive backend for itself; notebooks keep theirs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from minima.results import Curve

LOSS_COLOR, ACC_COLOR = "tab:blue", "tab:red"
# Train solid with round markers, test dashed with square markers; long legend handles so the dashes show.
SPLIT_STYLE = {"train": {"linestyle": "-", "marker": "o"}, "test": {"linestyle": (0, (5, 2)), "marker": "s"}}


def plot_curve(curve: Curve, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Cross-entropy (log scale, left axis) and accuracy (right axis) against α; train solid, test dashed;
    α = 0 and α = 1 marked with the checkpoints' names; non-finite or missing points masked, and points with
    non-finite samples annotated with their count. The legend sits below the axes, off the curves."""
    if ax is None:
        import matplotlib.pyplot as plt  # only here: a notebook asking for a new figure

        fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    fig = ax.figure
    acc_ax = ax.twinx()
    a = curve.alpha
    for split, style in SPLIT_STYLE.items():
        loss = np.asarray(getattr(curve, f"{split}_loss"), dtype=float)
        acc = np.asarray(getattr(curve, f"{split}_accuracy"), dtype=float)
        ok = np.isfinite(loss) & (loss > 0)
        ax.plot(a[ok], loss[ok], color=LOSS_COLOR, markersize=3, label=f"{split} cross-entropy", **style)
        acc_ax.plot(a, np.where(np.isfinite(acc), acc, np.nan), color=ACC_COLOR, markersize=3,
                    label=f"{split} accuracy", **style)
        nonfinite = np.asarray(getattr(curve, f"{split}_nonfinite"))
        for x, n in zip(a[nonfinite > 0], nonfinite[nonfinite > 0], strict=True):
            ax.annotate(f"{n} non-finite ({split})", (x, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="center", fontsize=7, color="0.3")
    ax.set_yscale("log")
    ax.set_xlabel("α   (θ = (1 − α)·θ_A + α·θ_B)")
    ax.set_ylabel("cross-entropy (nats)", color=LOSS_COLOR)
    acc_ax.set_ylabel("accuracy", color=ACC_COLOR)
    acc_ax.set_ylim(0.0, 1.02)
    for x, name in ((0.0, curve.name_a), (1.0, curve.name_b)):
        ax.axvline(x, color="0.6", lw=0.8, zorder=0)
        ax.annotate(name, (x, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="0.25", rotation=90, va="bottom")
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=4,
              handlelength=4.0, frameon=False)
    policy = curve.attrs.get("bn_policy", "?")
    ax.set_title(title or f"{curve.name_a} → {curve.name_b}  (BatchNorm: {policy})", fontsize=9)
    return fig


def save_curve_figure(curve: Curve, path: str | Path, dpi: int = 130) -> Path:
    """Draw :func:`plot_curve` into ``path`` (PNG/PDF/SVG by extension) without pyplot."""
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    plot_curve(curve, ax=fig.add_subplot())
    fig.savefig(path, dpi=dpi)
    return Path(path)
