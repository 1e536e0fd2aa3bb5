"""Figures from result files only — plotting never computes a metric and never imports a model.

:func:`plot_curve` draws a Keskar-style parametric plot into a given or new axes (pyplot, for notebooks),
:func:`plot_curves` overlays several curves, :func:`plot_surface` draws a plane (contours of the training loss,
filled contours of the test accuracy, a 3-D view). The ``save_*`` functions write a file through a bare
:class:`matplotlib.figure.Figure`, so they need no pyplot state and leave matplotlib's backend and global settings
as they are (the command ``python -m minima.plot`` chooses a non-interactive backend for itself; notebooks keep
theirs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke

from minima.files.naming import run_label
from minima.files.results import Curve, Grid
from minima.geometry.barriers import barriers

LOSS_COLOR, ACC_COLOR = "tab:blue", "tab:red"
# Train solid with round markers, test dashed with square markers; long legend handles so the dashes show.
SPLIT_STYLE = {"train": {"linestyle": "-", "marker": "o"}, "test": {"linestyle": (0, (5, 2)), "marker": "s"}}


def describe(attrs: dict) -> str:
    """What a result was computed on, for a title: the BatchNorm policy and the images (train / test, and the
    chain of subsets they were drawn by), from a grid file's attributes."""
    try:
        config = json.loads(attrs.get("config", "{}"))
    except (TypeError, ValueError):
        config = {}
    data = config.get("data") or {}
    parts = [f"BatchNorm {attrs.get('bn_policy', '?')}"]
    if config.get("repair"):
        parts.append("REPAIR")
    if "train_size" in data:
        parts.append(f"{data['train_size']:,} train / {data['test_size']:,} test images")
    return " · ".join(parts)


def readable_log_axis(ax: Axes) -> None:
    """Label a log y axis that spans few decades so that it can be read: below a decade plain tick labels (0.3, 0.4)
    instead of 3 × 10⁻¹, every minor tick labelled below a ratio of 3, else labelled ticks at 2 and 5 × 10^k (so that
    a range holding no power of ten, e.g. 1.4e4–7.2e4, still has labels); up to three decades the powers of ten and
    2 and 5 × 10^k, all in plain numbers (0.02, 0.05, 0.1, …) rather than two labels 10⁻¹ and 10⁰."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.3g}")  # 50,000 not 5e+04
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        ax.yaxis.set_major_formatter(plain)
        if hi / lo >= 3:
            ax.yaxis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    elif lo > 0 and hi / lo < 1000:
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)


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
    readable_log_axis(ax)
    kind = str(curve.attrs.get("path_kind", ""))
    ax.set_xlabel("t along the curve   (t = 0: A, t = 1: B)" if "curve" in kind else "α   (θ = (1 − α)·θ_A + α·θ_B)")
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
    found = barriers(curve) if str(curve.attrs.get("checkpoint_b", "segment")) else {}  # not along a random direction
    extra = ("\nbarrier (max above the endpoints' line, α ∈ [0, 1]):\nloss train "
             f"{found['barrier_train_loss']:.3g}, test {found['barrier_test_loss']:.3g}; accuracy train "
             f"{found['barrier_train_accuracy']:.3g}, test {found['barrier_test_accuracy']:.3g}") if found else ""
    what = f"{kind}: " if kind else ""
    ax.set_title(title or f"{what}{curve.name_a} → {curve.name_b} · {describe(curve.attrs)}{extra}", fontsize=9)
    return fig


def _save(draw: Any, what: Any, path: str | Path, size: tuple[float, float], dpi: int) -> Path:
    """``draw(what, ax=…)`` on one panel of a bare :class:`Figure` (no pyplot state), written to ``path``."""
    fig = Figure(figsize=size, layout="constrained")
    draw(what, ax=fig.add_subplot())
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_curve_figure(curve: Curve, path: str | Path, dpi: int = 130) -> Path:
    """Draw :func:`plot_curve` into ``path`` (PNG/PDF/SVG by extension) without pyplot."""
    return _save(plot_curve, curve, path, (7.0, 4.6), dpi)


# ------------------------------------------------------------------------------------------ several curves
def curve_label(curve: Curve) -> str:
    """How a curve is named in a legend: the checkpoint for a direction through one, A → B for a segment."""
    if not str(curve.attrs.get("checkpoint_b", "")):
        return curve.name_a
    kind = str(curve.attrs.get("path_kind", ""))  # a trained curve and the straight line between its ends differ
    return f"{curve.name_a} → {curve.name_b}" + (f" ({kind})" if kind else "")


def plot_curves(curves: list[Curve], ax: Axes | None = None, labels: list[str] | None = None,
                xlabel: str = "α", title: str | None = None) -> Figure:
    """Several curves in one panel (Li et al. 2018, Fig. 3 style): training loss solid, test loss dashed, one
    colour per curve, the legend naming each (``labels`` or :func:`curve_label`); non-finite points masked and
    counted in the legend."""
    if ax is None:
        import matplotlib.pyplot as plt  # only here: a notebook asking for a new figure

        fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    fig = ax.figure
    parts = [describe(c.attrs).split(" · ") for c in curves]
    common = [p for p in parts[0] if all(p in q for q in parts)] if parts else []
    own = [[p for p in q if p not in common] for q in parts]  # what differs goes into each curve's legend entry
    shared = not any(own)
    for k, curve in enumerate(curves):
        color = f"C{k % 10}"
        name = labels[k] if labels is not None else curve_label(curve)
        if own[k]:
            name += " · " + " · ".join(own[k])
        for split, style in SPLIT_STYLE.items():
            loss = np.asarray(getattr(curve, f"{split}_loss"), dtype=float)
            ok = np.isfinite(loss) & (loss > 0)
            bad = int((~np.isfinite(loss)).sum())
            extra = f", {bad} non-finite" if bad else ""
            ax.plot(curve.alpha[ok], loss[ok], color=color, markersize=3, label=f"{name} ({split}{extra})", **style)
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats)")
    if curves:
        said = " · ".join(common) + ("" if shared else "; the rest of each curve's settings in its legend entry")
        ax.set_title((f"{title}\n" if title else "") + said, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, handlelength=4.0, frameon=False)
    return fig


def save_curves_figure(curves: list[Curve], path: str | Path, dpi: int = 130, labels: list[str] | None = None,
                       xlabel: str = "α", title: str | None = None) -> Path:
    """Draw :func:`plot_curves` into ``path`` without pyplot."""
    return _save(lambda c, ax: plot_curves(c, ax, labels, xlabel, title), curves, path, (7.0, 4.8), dpi)


# ----------------------------------------------------------------------------------------------- surfaces
def _marks(grid: Grid) -> tuple[dict[str, list[float]], np.ndarray | None]:
    marks = json.loads(grid.attrs.get("marks", "{}"))
    path = grid.attrs.get("path")
    return marks, (np.asarray(json.loads(path), dtype=float) if path else None)


HALO = [withStroke(linewidth=2.5, foreground="white")]  # labels stay legible on dark filled contours
# Where a mark's label may go, in points from the mark, tried in order until it overlaps no label placed before.
LABEL_OFFSETS = ((4, 4), (4, -11), (-6, 4), (-6, -11), (4, 14), (4, -21), (-6, 14), (-6, -21))


def overlay_marks(ax: Axes, grid: Grid) -> None:
    """A plane's marked checkpoints (labels placed clear of each other) and projected trajectory on ``ax``."""
    marks, path = _marks(grid)
    if path is not None:
        ax.plot(path[:, 0], path[:, 1], "-o", color="k", markersize=2.5, lw=1.0, label="trajectory")
    placed = []
    for name, (x, y) in marks.items():
        ax.plot([x], [y], "o", color="white", markeredgecolor="k", markersize=6)
        for dx, dy in LABEL_OFFSETS:  # the first place where the label overlaps no other label
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                               ha="left" if dx > 0 else "right", path_effects=HALO)
            box = text.get_window_extent()
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        else:
            text = ax.annotate(name, (x, y), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=7,
                               path_effects=HALO)
            box = text.get_window_extent()
        placed.append(box)


def plot_surface(grid: Grid, fig: Figure | None = None) -> Figure:
    """Three panels of a two-axis grid: the training loss as contours with log-spaced levels and its minimum
    marked (Li et al.'s style), the test accuracy as filled contours, and the training loss as a 3-D surface
    (log10); the plane's checkpoints and projected trajectory drawn on the first two. Non-finite points are
    masked and counted in the title."""
    from matplotlib.colors import LogNorm

    if fig is None:
        fig = Figure(figsize=(15.0, 4.6), layout="constrained")
    x, y = grid.coords[grid.axes[0]], grid.coords[grid.axes[1]]
    loss = np.asarray(grid.values["train/loss"], dtype=float).T  # (y, x) for contour
    acc = np.asarray(grid.values["test/accuracy"], dtype=float).T
    bad = ~np.isfinite(loss) | (loss <= 0)
    masked = np.ma.masked_array(loss, mask=bad)
    ax1 = fig.add_subplot(1, 3, 1)
    if (~bad).sum() >= 4 and float(masked.max()) > float(masked.min()):
        levels = np.geomspace(float(masked.min()), float(masked.max()), 20)
        cs = ax1.contour(x, y, masked, levels=levels, norm=LogNorm(), cmap="viridis", linewidths=0.8)
        fig.colorbar(cs, ax=ax1, label="training cross-entropy (nats, log levels)", ticks=levels[::3], format="%.3g")
        j, i = np.unravel_index(np.argmin(np.where(bad, np.inf, loss)), loss.shape)
        ax1.plot([x[i]], [y[j]], "*", color="red", markersize=9, alpha=0.8, label=f"lowest loss {loss[j, i]:.3g}")
        ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)  # off the plane
    overlay_marks(ax1, grid)
    ax2 = fig.add_subplot(1, 3, 2)
    acc_masked = np.ma.masked_invalid(acc)
    if acc_masked.count() >= 4:
        lo, hi = float(acc_masked.min()), float(acc_masked.max())
        levels = np.linspace(lo, hi, 21) if hi > lo else np.linspace(0.0, 1.0, 21)  # the scale fits the data
        cf = ax2.contourf(x, y, acc_masked, levels=levels, cmap="magma")
        fig.colorbar(cf, ax=ax2, label="test accuracy")
    overlay_marks(ax2, grid)
    ax3 = fig.add_subplot(1, 3, 3, projection="3d")
    if (~bad).any():
        xx, yy = np.meshgrid(x, y)
        ax3.plot_surface(xx, yy, np.log10(np.where(bad, np.nan, loss)), cmap="viridis", linewidth=0)
    from matplotlib.ticker import MaxNLocator

    ax3.zaxis.set_major_locator(MaxNLocator(4))  # few z ticks: the label stays clear of them
    ax3.set_zlabel("log₁₀ train loss", labelpad=6)
    ax3.set_box_aspect(None, zoom=0.8)  # room for the axis labels inside the panel
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel(grid.axes[0])
        ax.set_ylabel(grid.axes[1])
    kind = json.loads(grid.attrs.get("directions", "{}")).get("kind", "?")
    note = f"; {int(bad.sum())} non-finite point(s) masked" if bad.any() else ""
    through = ", ".join(json.loads(grid.attrs.get("marks", "{}"))) or ", ".join(
        run_label(p) for p in json.loads(grid.attrs.get("checkpoints", "[]")))  # the marks name x0 as x0
    fig.suptitle(f"{kind} plane" + (f" through {through}" if through else "") + f" · {describe(grid.attrs)}{note}",
                 fontsize=9)
    return fig


def plot_planes(grids: list[Grid], ax: Axes | None = None, labels: list[str] | None = None) -> Figure:
    """The training-loss contours of several planes on one panel (e.g. a loss-landscape surface and the minima plane
    computed with the same direction file): the first in colour, the others dashed, at the same log-spaced levels,
    each named in the legend."""
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    if ax is None:
        import matplotlib.pyplot as plt  # only here: a notebook asking for a new figure

        fig, ax = plt.subplots(figsize=(6.4, 5.4), layout="constrained")
    fig = ax.figure
    losses = [np.ma.masked_invalid(np.asarray(g.values["train/loss"], dtype=float).T) for g in grids]
    low = min(float(m.min()) for m in losses if m.count())
    high = max(float(m.max()) for m in losses if m.count())
    levels = np.geomspace(max(low, 1e-12), high, 16) if high > low else None
    handles = []
    for k, (grid, loss) in enumerate(zip(grids, losses, strict=True)):
        x, y = grid.coords[grid.axes[0]], grid.coords[grid.axes[1]]
        name = labels[k] if labels is not None else Path(grid.path or f"plane {k + 1}").stem
        style = {"cmap": "viridis", "norm": LogNorm()} if k == 0 else {"colors": f"C{k}", "linestyles": "dashed"}
        ax.contour(x, y, loss, levels=levels, linewidths=0.9, **style)
        handles.append(Line2D([], [], color="tab:green" if k == 0 else f"C{k}", linestyle="-" if k == 0 else "--",
                              label=f"{name} · {describe(grid.attrs)}"))
    ax.set_xlabel(grids[0].axes[0])
    ax.set_ylabel(grids[0].axes[1])
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title("training cross-entropy, log-spaced levels shared by all planes", fontsize=9)
    return fig


def save_planes_figure(grids: list[Grid], path: str | Path, dpi: int = 130) -> Path:
    """Draw :func:`plot_planes` into ``path`` without pyplot."""
    return _save(plot_planes, grids, path, (6.4, 5.6), dpi)


def save_surface_figure(grid: Grid, path: str | Path, dpi: int = 110) -> Path:
    """Draw :func:`plot_surface` into ``path`` without pyplot."""
    fig = plot_surface(grid)
    fig.savefig(path, dpi=dpi)
    return Path(path)


# ------------------------------------------------------------------------------------------ spectral density
DENSITY_WIDTH = 0.01  # Gaussian broadening σ, as a fraction of the range of the Ritz values drawn


def plot_density(densities: list[dict], ax: Axes | None = None, width: float = DENSITY_WIDTH) -> Figure:
    """Hessian eigenvalue densities of sharpness results (``metric`` density…: ``nodes``, ``weights``), PyHessian
    style: each quadrature broadened by Gaussians of σ = ``width`` × the range of all Ritz values, on a log y axis,
    one colour per checkpoint; the largest and smallest Ritz values of each are marked (the outlier that λ_max
    measures, and the most negative curvature), and the legend gives each density's mass below zero. Per-block
    densities (``--blocks``) are drawn by :func:`plot_block_densities` instead."""
    if ax is None:
        import matplotlib.pyplot as plt  # only here: a notebook asking for a new figure

        _, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    fig = ax.figure
    sigma = _draw_densities(ax, densities, width, _checkpoint_colours(densities))
    meta = densities[0]
    ax.set_title(f"Hessian eigenvalue density · BatchNorm {meta.get('bn_mode', '?')} · "
                 f"{int(meta.get('train_samples', 0)):,} training images\nbroadening σ = {sigma:.3g} "
                 f"({100 * width:g} % of the Ritz values' range); dotted: the largest and smallest Ritz values",
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)  # clear of the marks
    return fig


ROLE_COLOURS = {"sb": "C0", "lb": "C1"}  # Keskar's two regimes: one colour each in every figure, standalone or not


def _checkpoint_colours(densities: list[dict]) -> dict[str, str]:
    """One colour per checkpoint, the same in every panel: SB and LB their :data:`ROLE_COLOURS`, the others the
    remaining colours in the order the checkpoints first appear."""
    labels = list(dict.fromkeys(str(d["checkpoint_label"]) for d in densities))
    free = [f"C{k}" for k in range(10) if f"C{k}" not in {ROLE_COLOURS.get(lab) for lab in labels}]
    out = {}
    for label in labels:
        if label in ROLE_COLOURS:
            out[label] = ROLE_COLOURS[label]
        else:
            out[label] = free.pop(0) if free else "0.4"  # more than ten checkpoints: grey beyond
    return out


def _draw_densities(ax: Axes, densities: list[dict], width: float, colours: dict[str, str]) -> float:
    """The broadened densities on ``ax`` (log y, both extreme Ritz values dotted and labelled); returns σ."""
    from minima.curvature.hessian import broadened, negative_mass

    lo = min(float(np.min(d["nodes"])) for d in densities)
    hi = max(float(np.max(d["nodes"])) for d in densities)
    span = max(hi - lo, 1e-12)
    sigma = width * span
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 4000)
    for d in densities:
        dens = broadened(np.asarray(d["nodes"]), np.asarray(d["weights"]), grid, sigma)
        color = colours[str(d["checkpoint_label"])]
        below = negative_mass(np.asarray(d["nodes"]), np.asarray(d["weights"]))
        ax.plot(grid, np.maximum(dens, 1e-12), color=color, lw=1.2,
                label=f"{d['checkpoint_label']} ({int(d['probes'])} probes × {int(d['steps'])} steps, "
                      f"n = {int(d['dimension']):,}; spectral mass below 0: {100 * below:.2g} %)")
        for end in (float(np.max(d["nodes"])), float(np.min(d["nodes"]))):  # both ends: λ_max and the smallest
            ax.axvline(end, color=color, ls=":", lw=1.0)
            ax.annotate(f"{end:.3g}", (end, 0.99), xycoords=("data", "axes fraction"), color=color, fontsize=7,
                        ha="right", va="top", rotation=90, xytext=(-2, 0), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-10)  # low enough for an isolated outlier of one Ritz weight
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("density (Gaussian-broadened SLQ)")
    return sigma


def plot_block_densities(densities: list[dict], fig: Figure | None = None, width: float = DENSITY_WIDTH) -> Figure:
    """Per-block densities (results of ``--blocks``) as small multiples: one panel per block, in the network's order,
    titled with the block, the modules that own its parameters (``Linear 3072→512``, ``BatchNorm 512``) and its
    size; every checkpoint in each panel in the same colour throughout; one legend for all."""
    from minima.files.naming import natural_key

    blocks: dict[str, list[dict]] = {}
    for d in densities:
        blocks.setdefault(str(d["block"]), []).append(d)
    names = sorted(blocks, key=natural_key)
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    if fig is None:
        fig = Figure(figsize=(4.6 * cols, 3.4 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = _checkpoint_colours(densities)
    for ax, name in zip(axes, names, strict=False):
        found = blocks[name]
        _draw_densities(ax, found, width, colours)
        modules = found[0].get("block_modules")
        ax.set_title(f"{name}" + (f" · {modules}" if modules else "")
                     + f"\n{int(found[0].get('block_size', found[0]['dimension'])):,} parameters", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles = {ln.get_label().split(" (")[0]: ln for ax in axes for ln in ax.get_lines()
               if not ln.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4),
               fontsize=8, frameon=False)
    meta = densities[0]
    fig.suptitle(f"Hessian eigenvalue density of each block · BatchNorm {meta.get('bn_mode', '?')} · "
                 f"{int(meta.get('train_samples', 0)):,} training images · broadening σ = {100 * width:g} % of each "
                 "panel's Ritz values' range; dotted: the largest and smallest Ritz values", fontsize=9)
    return fig


def save_density_figure(densities: list[dict], path: str | Path, dpi: int = 130) -> Path:
    """Draw :func:`plot_density` (or, for per-block results, :func:`plot_block_densities`) into ``path`` without
    pyplot."""
    if any("block" in d for d in densities):
        plot_block_densities(densities).savefig(path, dpi=dpi)
        return Path(path)
    return _save(plot_density, densities, path, (7.0, 4.6), dpi)


# ------------------------------------------------------------------------------------------ probes over training
def plot_probes(line: dict, metrics: list[dict], title: str = "") -> Figure:
    """A training run's probe timeline (:func:`minima.files.timeline.load`): one panel per probe against the
    optimiser step with its stability threshold dashed (2/η, 2(1+β)/η or Adam's (2 + 2β₁)/((1 − β₁)η), where one
    applies; a SAM run's edge λ_SAM dotted), and the training loss per epoch (``metrics.jsonl`` rows) beneath on a
    log scale."""
    probes = [name for name in line if not name.startswith("_")]
    fig = Figure(figsize=(7.5, 2.6 * (len(probes) + 1)), layout="constrained")
    axes = fig.subplots(len(probes) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, probes, strict=False):
        plot_probe_runs({name: line}, name, ax)
        ax.set_xlabel("")  # the shared step axis is labelled once, beneath the loss
    loss_ax = axes[-1]
    if metrics:
        loss_ax.plot([m["step"] for m in metrics], [m["train_loss"] for m in metrics], "-", color="C2")
        loss_ax.set_yscale("log")
        readable_log_axis(loss_ax)
    loss_ax.set_ylabel("training loss")
    loss_ax.set_xlabel("optimiser step")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


PROBE_QUANTITIES = {"hessian": "λ_max of H", "preconditioned": "λ_max of P⁻¹ᐟ²HP⁻¹ᐟ²", "trace": "trace of H",
                    "density": "largest Ritz value of H", "worst_case": "worst-case sharpness",
                    "keskar": "Keskar's φ (%)", "adaptive": "adaptive sharpness", "average": "average sharpness"}


def plot_probe_runs(lines: dict[str, dict], probe: str, ax: Axes, x: str = "step") -> Axes:
    """One probe of several training runs (``{label: timeline}``, :func:`minima.files.timeline.load`) on one axes
    against ``x`` (``step`` or ``epoch``: runs with different batch sizes take different numbers of steps per epoch),
    each run's stability threshold dashed in its colour (offset dashes, so equal thresholds stay visible), log scale
    when every value is positive."""
    positive = True
    drawn: list[tuple[str, np.ndarray]] = []  # thresholds drawn so far, to say when one coincides with another's
    for k, (label, line) in enumerate(lines.items()):
        rows = line[probe]
        value = np.asarray(rows["value"], dtype=float)
        ax.plot(rows[x], value, "o-", ms=3, color=f"C{k}", label=label)
        threshold = np.asarray(rows.get("threshold", []), dtype=float)
        if threshold.size and np.isfinite(threshold).any():
            same = next((other for other, t in drawn if t.shape == threshold.shape
                         and np.allclose(t, threshold, rtol=1e-9, equal_nan=True)), None)
            drawn.append((label, threshold))
            # dashes offset per run: thresholds that coincide show both colours in turn
            ax.plot(rows[x], threshold, color=f"C{k}", lw=1.2, ls=(5 * k, (5, 5 * (len(lines) - 1) or 5)),
                    label=f"{label}: stability threshold" + (f" (the same as {same}'s)" if same else ""))
        edge = np.asarray(rows.get("sam_threshold", []), dtype=float)
        if edge.size and np.isfinite(edge).any():  # a SAM run: its own edge, below the base optimiser's
            ax.plot(rows[x], edge, color=f"C{k}", lw=1.2, ls=":", label=f"{label}: SAM's edge λ_SAM")
        positive &= bool(np.all(value[np.isfinite(value)] > 0))
    if positive:
        ax.set_yscale("log")
        readable_log_axis(ax)
    ax.set(xlabel="optimiser step" if x == "step" else "epoch", ylabel=PROBE_QUANTITIES.get(probe, probe))
    ax.legend(fontsize=7, loc="best")
    return ax


def save_probes_figure(line: dict, metrics: list[dict], path: str | Path, title: str = "", dpi: int = 130) -> Path:
    """Draw :func:`plot_probes` into ``path``."""
    fig = plot_probes(line, metrics, title)
    fig.savefig(path, dpi=dpi)
    return Path(path)



def plot_correlations(scores: list[dict], hparams: list[str], nets: Any, color: str, title: str) -> Figure:
    """A generalisation study's figure: left, ψ_k of every measure (rows) for every hyper-parameter (columns) with Ψ
    and τ in the row labels (a diverging scale from −1 to 1); right, each measure against the generalisation gap, one
    small panel per measure (ranks, so measures of any scale share one axis), coloured by hyper-parameter ``color``.
    ``nets``: the :class:`~minima.pipelines.correlation.Networks` scored."""
    n = len(scores)
    cols = min(n, 3)
    rows = -(-n // cols)
    left_width = 4.0 + 0.9 * len(hparams)  # the row labels take about 3 inches, each hyper-parameter 0.9
    fig = Figure(figsize=(left_width + 2.6 * cols, max(3.6, 0.45 * n + 1.6, 2.4 * rows)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=(left_width, 2.6 * cols))
    ax = left.add_subplot()
    psi = np.array([[s.get(f"psi_{h}", np.nan) for h in hparams] for s in scores], dtype=float)
    image = ax.imshow(psi, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(hparams)), hparams, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{s['measure']}  (Ψ {s['psi']:+.2f}, τ {s['kendall_tau']:+.2f})" for s in scores],
                  fontsize=7)
    for (i, j), v in np.ndenumerate(psi):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 0.5 else "black")
    bar = left.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("ψ_k: τ when only this hyper-parameter varies", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title("granulated Kendall τ per hyper-parameter", fontsize=9)
    values = sorted(set(nets.hparams[color]))
    codes = np.array([values.index(v) for v in nets.hparams[color]])
    from scipy.stats import rankdata  # ties share their mean rank (a constant measure is one vertical line)

    gap_rank = rankdata(nets.gap)
    axes = right.subplots(rows, cols, squeeze=False)
    for k, s in enumerate(scores):
        a = axes[k // cols][k % cols]
        mu = nets.measures[s["measure"]]
        for c, v in enumerate(values):
            sel = codes == c
            a.scatter(rankdata(mu)[sel], gap_rank[sel], s=10, color=f"C{c}", label=f"{color}={v}")
        a.set_title(f"{s['measure']}\n(τ {s['kendall_tau']:+.2f})", fontsize=7)
        a.set_xlabel("rank of the measure", fontsize=7)
        a.set_ylabel("rank of the gap", fontsize=7)
        a.tick_params(labelsize=6)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig
