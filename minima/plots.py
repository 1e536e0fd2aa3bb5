"""Figures from result files only — plotting never computes a metric.

``python -m minima.plot FILE.h5 [FILE2.h5 ...] [--out FIG.png]`` redraws Keskar-style parametric plots.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; notebooks switch backends themselves
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from minima.results import Curve, ResultsError, load_curve


def plot_curve(curve: Curve, ax: plt.Axes | None = None, title: str | None = None) -> Figure:
    """Cross-entropy (log scale, left axis) and accuracy (right axis) against α; train solid, test dashed;
    α = 0 and α = 1 marked with the checkpoints' names; non-finite or missing points masked, and rows with
    non-finite samples annotated with their count."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    else:
        fig = ax.figure
    acc_ax = ax.twinx()
    a = curve.alpha
    for split, style in (("train", "-"), ("test", "--")):
        loss = np.asarray(getattr(curve, f"{split}_loss"), dtype=float)
        acc = np.asarray(getattr(curve, f"{split}_accuracy"), dtype=float)
        ok = np.isfinite(loss) & (loss > 0)
        ax.plot(a[ok], loss[ok], style, color="tab:blue", marker=".", label=f"{split} cross-entropy")
        acc_ax.plot(a, np.where(np.isfinite(acc), acc, np.nan), style, color="tab:red", marker=".",
                    label=f"{split} accuracy")
        bad = np.asarray(getattr(curve, f"{split}_nonfinite")) > 0
        for x, n in zip(a[bad], np.asarray(getattr(curve, f"{split}_nonfinite"))[bad], strict=True):
            ax.annotate(f"{n} non-finite ({split})", (x, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="center", fontsize=7, color="0.3")
    ax.set_yscale("log")
    ax.set_xlabel("α   (θ = (1 − α)·θ_A + α·θ_B)")
    ax.set_ylabel("cross-entropy (nats)", color="tab:blue")
    acc_ax.set_ylabel("accuracy", color="tab:red")
    acc_ax.set_ylim(0.0, 1.02)
    for x, name in ((0.0, curve.name_a), (1.0, curve.name_b)):
        ax.axvline(x, color="0.6", lw=0.8, zorder=0)
        ax.annotate(name, (x, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="0.25", rotation=90, va="bottom")
    handles = ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="best")
    policy = curve.attrs.get("bn_policy", "?")
    ax.set_title(title or f"{curve.name_a} → {curve.name_b}  (BatchNorm: {policy})", fontsize=9)
    return fig


def save_curve_figure(curve: Curve, path: str | Path, dpi: int = 130) -> Path:
    """Draw :func:`plot_curve` into ``path`` (PNG/PDF/SVG by extension) and close the figure."""
    fig = plot_curve(curve)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minima.plot", description="Redraw figures from .h5 curve files.")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output image (default: FILE.png beside each file)")
    args = p.parse_args(argv)
    if args.out is not None and len(args.files) > 1:
        print("error: --out takes one input file", file=sys.stderr)
        return 2
    for f in args.files:
        try:
            curve = load_curve(f)
        except ResultsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        out = save_curve_figure(curve, args.out or f.with_suffix(".png"))
        print(f"wrote {out}")
    return 0
