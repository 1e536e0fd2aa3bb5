"""Grid files of any shape: layout, pending points, resume, the legacy curve format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from minima.files import results
from minima.plot import main as plot_main

from .helpers import toy_checkpoint, toy_dataset


def _values(k: int) -> dict[str, float | int]:
    return {"train/loss": 0.5 + k, "train/accuracy": 0.25, "train/nonfinite": k % 2, "test/loss": 1.5 + k,
            "test/accuracy": 0.75, "test/nonfinite": 0, "bn/negative_variance": 0}


def test_a_plane_is_written_point_by_point_and_resumed(tmp_path: Path) -> None:
    coords = {"x": np.linspace(-1, 1, 3), "y": np.array([0.0, 0.5])}
    path = tmp_path / "plane.h5"
    results.create_grid_file(path, coords, {"bn_policy": "recompute", "config": json.dumps({"bn": "recompute"})})
    grid = results.load_grid(path)
    assert grid.shape == (3, 2) and grid.axes == ("x", "y") and not grid.done.any()
    assert np.isnan(grid.values["train/loss"]).all() and (grid.values["test/nonfinite"] == -1).all()
    rows = results.grid_points(coords)
    assert rows.shape == (6, 2) and rows[1].tolist() == [-1.0, 0.5] and rows[2].tolist() == [0.0, 0.0]  # C order
    for i in (0, 4):
        results.write_point(path, i, _values(i))
    expected = {"bn_policy": "recompute", "config": {"bn": "recompute"}}
    assert results.pending_points(path, coords, expected) == [1, 2, 3, 5]
    grid = results.load_grid(path)
    assert grid.values["train/loss"][0, 0] == 0.5 and grid.values["train/loss"][2, 0] == 4.5  # point 4 = (2, 0)
    assert grid.values["train/nonfinite"][0, 0] == 0 and grid.done.sum() == 2 and not grid.complete
    with pytest.raises(results.ResultsError, match="another grid"):
        results.pending_points(path, {"x": coords["x"], "y": np.array([0.0, 1.0])}, expected)
    with pytest.raises(results.ResultsError, match=r"bn: 'recompute' → 'batch'"):
        results.pending_points(path, coords, {"config": {"bn": "batch"}})
    with pytest.raises(results.ResultsError, match="2-axis grid"):
        results.load_curve(path)
    for i in (1, 2, 3, 5):
        results.write_point(path, i, _values(i))
    assert results.load_grid(path).complete and results.pending_points(path, coords, expected) == []


def _legacy_curve_file(path: Path, alphas: np.ndarray, done: int, attrs: dict) -> None:
    """A file in the layout minima wrote before grids (format minima.curve/1, /alpha at the root)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "minima.curve/1"
        for k, v in attrs.items():
            f.attrs[k] = v
        f["alpha"] = alphas
        for name in results.POINT_FIELDS:
            if name in results.INT_FIELDS:
                f[name] = np.full(len(alphas), -1, dtype=np.int64)
            else:
                f[name] = np.full(len(alphas), np.nan)
        for i in range(done):
            for name, value in _values(i).items():
                f[name][i] = value


def test_legacy_curve_files_open_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "old.h5"
    alphas = np.array([-1.0, 0.0, 1.0])
    _legacy_curve_file(path, alphas, 2, {"bn_policy": "none", "checkpoint_a": "x/a.pt",
                                          "config": json.dumps({"bn": "none", "world_size": 1})})
    curve = results.load_curve(path)
    assert curve.alpha.tolist() == alphas.tolist() and curve.train_loss[1] == 1.5 and not curve.complete
    assert curve.name_a == "a"
    assert results.pending_points(path, {"alpha": alphas}, {"config": {"bn": "none"}}) == [2]
    results.write_point(path, 2, _values(2))
    assert results.load_curve(path).complete
    assert plot_main([str(path), "--out", str(tmp_path / "old.png")]) == 0


def test_a_sweep_resumes_a_legacy_file(tmp_path: Path) -> None:
    """A curve file written by the previous version (minima.curve/1) is resumed by the new sweep."""
    from minima.studies.interpolate import SweepRequest, run

    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds)
    req = SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas="0,0.5,1", out=tmp_path / "new.h5", device="cpu",
                       plot=False, progress=False)
    fresh = results.load_grid(run(req))
    old = tmp_path / "old.h5"
    attrs = {k: v for k, v in fresh.attrs.items() if k in ("sha256_a", "sha256_b", "bn_policy", "config")}
    _legacy_curve_file(old, np.array([0.0, 0.5, 1.0]), 0, attrs)
    with h5py.File(old, "r+") as f:  # the first point as the old version computed it
        for name in results.POINT_FIELDS:
            f[name][0] = fresh.values[name][0]
    from dataclasses import replace

    run(replace(req, out=old, resume=True))
    resumed = results.load_curve(old)
    assert resumed.complete and resumed.attrs["format"] == "minima.curve/1"
    np.testing.assert_array_equal(resumed.test_loss, fresh.values["test/loss"])


def test_plotting_a_sharpness_file_says_how_to_read_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.h5"
    results.ensure_sharpness_file(path)
    assert plot_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds sharpness results" in err and "load_sharpness" in err and "remove" not in err
