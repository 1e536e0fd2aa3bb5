"""Figures hold what they claim: axes, lines or contours and labels from the data — not just a file of some size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure

from minima.figures import plot_curve, plot_curves, plot_surface
from minima.files.results import Grid, curve_from_values

from .helpers import assert_drawn


def _values(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    loss = 0.1 + rng.random(shape)
    return {"train/loss": loss, "test/loss": 1.5 * loss, "train/accuracy": 1 - loss / 2,
            "test/accuracy": 1 - loss / 1.5, "train/nonfinite": np.zeros(shape, dtype=np.int64),
            "test/nonfinite": np.zeros(shape, dtype=np.int64), "bn/negative_variance": np.zeros(shape, dtype=np.int64)}


def test_a_curve_figure_has_both_axes_four_lines_from_the_data_and_its_labels() -> None:
    alpha = np.linspace(-1, 2, 7)
    values = _values((7,))
    config = json.dumps({"data": {"train_size": 5000, "test_size": 1000}})
    curve = curve_from_values(alpha, values, {"bn_policy": "recompute", "label_a": "sb", "label_b": "lb",
                                              "config": config})
    fig = plot_curve(curve, ax=Figure().add_subplot())
    loss_ax, acc_ax = fig.axes
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"train cross-entropy", "test cross-entropy", "train accuracy", "test accuracy"}
    np.testing.assert_allclose(lines["test cross-entropy"].get_ydata(), values["test/loss"])
    np.testing.assert_allclose(lines["train accuracy"].get_xdata(), alpha)
    assert loss_ax.get_yscale() == "log" and loss_ax.get_ylabel() == "cross-entropy (nats)"
    assert acc_ax.get_ylabel() == "accuracy" and "sb → lb" in loss_ax.get_title()
    title = loss_ax.get_title()
    assert title.startswith("sb → lb · BatchNorm recompute · 5,000 train / 1,000 test images\nbarrier"), title
    # a log axis spanning under a decade is labelled in plain numbers, not 2.75 × 10⁰
    narrow = {**values, "train/loss": np.linspace(2.5, 4.0, 7), "test/loss": np.linspace(2.6, 4.2, 7)}
    fig = plot_curve(curve_from_values(alpha, narrow, curve.attrs), ax=Figure().add_subplot())
    fig.canvas.draw()
    axis = fig.axes[0].yaxis
    labels = [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels() if t.get_text()]
    assert labels and not any("times" in s or "10^" in s for s in labels), labels
    overlay = plot_curves([curve, curve], ax=Figure().add_subplot(), labels=["one", "two"])
    assert len([ln for ln in overlay.axes[0].get_lines() if not ln.get_label().startswith("_")]) >= 2


def test_a_surface_figure_has_contours_filled_contours_a_3d_panel_and_its_marks() -> None:
    coords = {"x": np.linspace(-1, 1, 5), "y": np.linspace(-1, 1, 4)}
    grid = Grid(axes=("x", "y"), coords=coords, values=_values((5, 4)),
                attrs={"bn_policy": "batch", "directions": json.dumps({"kind": "checkpoints"}),
                       "marks": json.dumps({"A": [0.0, 0.0], "B": [1.0, 0.0]})})
    fig = plot_surface(grid)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and panels[2].name == "3d"
    assert all(ax.get_xlabel() == "x" and ax.get_ylabel() == "y" for ax in panels)
    contours = [[c for c in ax.get_children() if isinstance(c, ContourSet)] for ax in panels[:2]]
    assert len(contours[0]) == 1 and not contours[0][0].filled  # training loss: line contours
    assert len(contours[1]) == 1 and contours[1][0].filled  # test accuracy: filled contours
    accuracy = grid.values["test/accuracy"]
    assert contours[1][0].levels[0] == pytest.approx(accuracy.min()) and contours[1][0].levels[-1] == pytest.approx(
        accuracy.max())  # the colour scale fits the data
    labels = [t.get_text() for ax in panels[:2] for t in ax.texts]
    assert "A" in labels and "B" in labels, labels
    assert fig.get_suptitle().startswith("checkpoints plane through A, B · BatchNorm batch")
    minimum = [ln for ln in panels[0].get_lines() if ln.get_label().startswith("lowest loss")]
    assert len(minimum) == 1 and float(minimum[0].get_ydata()[0]) in coords["y"]


def test_the_png_check_fails_on_a_blank_figure(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Figure(figsize=(4, 3)).savefig(blank)
    with pytest.raises(AssertionError, match="pixels are drawn"):
        assert_drawn(blank)


def test_labels_of_marks_close_together_do_not_overlap(tmp_path: Path) -> None:
    """x0, SB and LB a few pixels apart on a plane: after drawing, no two text boxes of a panel intersect."""
    coords = {"x": np.linspace(-1, 2, 21), "y": np.linspace(-1, 1, 21)}
    marks = {"x0 (sb)": [0.0, 0.0], "sb": [0.04, 0.02], "lb": [0.02, -0.03]}
    grid = Grid(axes=("x", "y"), coords=coords, values=_values((21, 21)),
                attrs={"bn_policy": "recompute", "directions": json.dumps({"kind": "checkpoints"}),
                       "marks": json.dumps(marks)})
    fig = plot_surface(grid)
    fig.savefig(tmp_path / "marks.png")  # lays the figure out: the boxes are final
    for ax in [a for a in fig.axes if a.get_label() != "<colorbar>"][:2]:
        boxes = [t.get_window_extent() for t in ax.texts]
        assert len(boxes) == 3
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())


@pytest.mark.parametrize(("lo", "hi"), [(1.4e4, 7.2e4), (0.3, 0.5), (2.0, 300.0)])
def test_a_log_axis_always_has_labelled_ticks_inside_its_range(lo: float, hi: float) -> None:
    """A log y axis whose range holds no power of ten (1.4e4–7.2e4) still shows labelled ticks within it, and one of
    two decades more than its two powers of ten (2, 5, 10, 20, …: issue 30 item 5, "log axes with one or two tick
    labels")."""
    from minima.figures import readable_log_axis

    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [lo, (lo * hi) ** 0.5, hi])
    ax.set_yscale("log")
    readable_log_axis(ax)
    fig.canvas.draw()
    ymin, ymax = ax.get_ylim()
    shown = [t for t in [*ax.yaxis.get_majorticklabels(), *ax.yaxis.get_minorticklabels()]
             if t.get_text() and ymin <= t.get_position()[1] <= ymax]
    assert len(shown) >= (5 if hi / lo > 100 else 2), [t.get_text() for t in shown]


def test_a_trained_curve_and_a_line_are_labelled_as_what_they_are() -> None:
    """Issue 30 item 5: a curve's x axis is t along the curve and its title says it is one; overlaid, a curve and a
    line carry their kinds, and files on different images each name their own."""
    alpha = np.linspace(0, 1, 5)

    def made(kind: str, test_size: int) -> object:
        config = json.dumps({"data": {"train_size": 1000, "test_size": test_size}})
        return curve_from_values(alpha, _values((5,)), {"bn_policy": "recompute", "label_a": "sb",
                                                        "label_b": "lb_aligned_to_sb", "checkpoint_b": "b.pt",
                                                        "path_kind": kind, "config": config})

    curve, line = made("bezier curve (1 bend(s))", 2000), made("straight line between the endpoints", 1000)
    ax = plot_curve(curve, ax=Figure().add_subplot()).axes[0]
    assert ax.get_xlabel().startswith("t along the curve") and ax.get_title().startswith("bezier curve (1 bend(s)): ")
    ax = plot_curves([curve, line], ax=Figure().add_subplot()).axes[0]
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert any("bezier curve" in lab and "2,000 test" in lab for lab in labels), labels
    assert any("straight line" in lab and "1,000 test" in lab for lab in labels), labels
    assert "2,000" not in ax.get_title() and "in its legend entry" in ax.get_title()
    # what the curves share is said once, in the title, not in every legend entry
    assert "BatchNorm recompute" in ax.get_title() and not any("BatchNorm" in lab for lab in labels), labels


def test_sb_and_lb_keep_their_colours_and_probe_panels_name_their_quantity() -> None:
    """Issue 30 item 5: SB blue and LB orange whichever order a file lists them in; a probe panel's y label is the
    quantity; a threshold that coincides with another run's says so in the legend."""
    from minima.figures import _checkpoint_colours, plot_probe_runs

    assert _checkpoint_colours([{"checkpoint_label": "lb"}, {"checkpoint_label": "sb"}]) == {"lb": "C1", "sb": "C0"}
    assert _checkpoint_colours([{"checkpoint_label": "x"}, {"checkpoint_label": "sb"}])["x"] == "C1"
    rows = {"step": np.array([1.0, 2.0]), "value": np.array([3.0, 4.0]), "threshold": np.array([5.0, 5.0])}
    ax = Figure().add_subplot()
    plot_probe_runs({"a": {"hessian": rows}, "b": {"hessian": rows}}, "hessian", ax)
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert ax.get_ylabel() == "λ_max of H" and "b: stability threshold (the same as a's)" in labels, labels


def test_a_density_marks_both_ends_and_its_mass_below_zero() -> None:
    """Issue 29 item 1: the density plot marks the smallest Ritz value beside the largest, and the legend gives the
    share of the spectrum below zero."""
    from minima.figures import plot_density

    d = {"checkpoint_label": "sb", "nodes": np.array([-0.5, 0.1, 3.0]), "weights": np.array([0.2, 0.7, 0.1]),
         "probes": 1, "steps": 3, "dimension": 10}
    ax = plot_density([d], ax=Figure().add_subplot()).axes[0]
    assert {t.get_text() for t in ax.texts} == {"3", "-0.5"}
    (label,) = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert "below 0: 20 %" in label
