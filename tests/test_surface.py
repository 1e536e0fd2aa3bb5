"""Loss surfaces: the three planes, their numerics, the command, resume, sharding and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minima import data
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.directions import (
    DirectionError,
    checkpoint_plane,
    random_direction,
    random_plane,
    trajectory_plane,
)
from minima.geometry.evaluate import Batching, evaluate, recompute_bn_stats
from minima.models import build_model
from minima.studies.surface import SurfaceRequest, run, surface
from minima.studies.train import TrainConfig, train
from minima.surface import main

from .helpers import SHAPE, assert_drawn, free_port, killed_after_points, rank_worker, toy_checkpoint, toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int, batchnorm: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=3, input_shape=SHAPE, widths=(6,), batchnorm=batchnorm).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    return model.eval()


def _req(paths: list[Path], out: Path, **kw: object) -> SurfaceRequest:
    base = dict(checkpoints=paths, x="-1:1:3", y="-1:1:3", out=out, device="cpu", plot=False, progress=False)
    base.update(kw)
    return SurfaceRequest(**base)


def test_plane_through_three_checkpoints_reproduces_each_in_float64() -> None:
    ds = toy_dataset()
    models = [_model(s) for s in (1, 2, 3)]
    states = [m.state_dict() for m in models]
    plane = checkpoint_plane(states, ["A", "B", "C"])
    assert plane.marks["A"] == (0.0, 0.0) and plane.marks["B"] == (1.0, 0.0) and plane.marks["C"][1] > 0
    for name, state in zip("ABC", states, strict=True):
        at = plane.point(*plane.marks[name])
        for key, value in state.items():
            torch.testing.assert_close(at[key], value, rtol=1e-12, atol=1e-14)
    # d2 ⟂ d1 and |d2| = |d1| = ‖B − A‖ (coordinates in units of ‖B − A‖)
    keys = list(plane.d1)
    d1 = torch.cat([plane.d1[k].reshape(-1) for k in keys])
    d2 = torch.cat([plane.d2[k].reshape(-1) for k in keys])
    assert abs(float(d1 @ d2)) <= 1e-10 * float(d1.norm()) ** 2
    assert float(d2.norm()) == pytest.approx(float(d1.norm()), rel=1e-12)
    # the grid holds the three checkpoints; each point's loss is the checkpoint's own (interpolated BN buffers =
    # the checkpoint's buffers there)
    cx, cy = plane.marks["C"]
    grid = surface(models[0], plane, ds.train, ds.test, [0.0, 1.0, cx], [0.0, cy], bn="interpolate", mean=ds.mean,
                   std=ds.std, dtype=torch.float64)
    for name, (i, j) in (("A", (0, 0)), ("B", (1, 0)), ("C", (2, 1))):
        direct = evaluate(models["ABC".index(name)], ds.train, ds.mean, ds.std, Batching(dtype=torch.float64))
        assert grid.values["train/loss"][i, j] == pytest.approx(direct.loss, rel=1e-12)
        assert grid.values["train/accuracy"][i, j] == direct.accuracy
    collinear = [states[0], states[1], {k: 2 * v - states[0][k] if v.is_floating_point() else v
                                        for k, v in states[1].items()}]
    with pytest.raises(DirectionError, match="collinear"):
        checkpoint_plane(collinear, ["A", "B", "C"])


@pytest.mark.parametrize(("norm", "ignore"), [("filter", "bn-and-bias"), ("layer", "bn-and-bias"),
                                              ("filter", "none"), ("none", "bn-and-bias")])
def test_random_plane_normalisation(norm: str, ignore: str) -> None:
    model = _model(4)
    state = model.state_dict()
    plane = random_plane(model, state, seed=7, norm=norm, ignore=ignore)
    assert plane.provenance == {"kind": "random", "seeds": [7, 8], "norm": norm, "ignore": ignore}
    w = state["net.1.weight"]
    for d in (plane.d1, plane.d2):
        if norm == "filter":
            torch.testing.assert_close(d["net.1.weight"].norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
        elif norm == "layer":
            assert float(d["net.1.weight"].norm()) == pytest.approx(float(w.norm()), rel=1e-12)
        one_d = d["net.1.bias"]
        assert torch.equal(one_d, torch.zeros_like(one_d)) if ignore == "bn-and-bias" else torch.equal(
            one_d, state["net.1.bias"])
        assert "net.2.running_mean" not in d  # BatchNorm statistics are the BN policy's business
    assert not torch.equal(plane.d1["net.1.weight"], plane.d2["net.1.weight"])
    alone = random_direction(model, state, 7, norm, ignore)
    torch.testing.assert_close(plane.d1["net.1.weight"], alone["net.1.weight"])
    at = plane.point(0.3, -0.7)
    assert torch.equal(at["net.2.num_batches_tracked"], state["net.2.num_batches_tracked"])  # integers untouched
    assert torch.equal(at["net.2.running_var"], state["net.2.running_var"])


def test_bn_recompute_at_a_grid_point_equals_a_direct_re_estimation() -> None:
    ds = toy_dataset()
    model = _model(5)
    plane = random_plane(model, model.state_dict(), seed=1)
    grid = surface(model, plane, ds.train, ds.test, [0.5], [-0.5], bn="recompute", mean=ds.mean, std=ds.std,
                   dtype=torch.float64, batch_size=40)
    direct = _model(5)
    direct.load_state_dict(plane.point(0.5, -0.5))
    recompute_bn_stats(direct, ds.train, ds.mean, ds.std, Batching(40, dtype=torch.float64))
    for split in ("train", "test"):
        ref = evaluate(direct, getattr(ds, split), ds.mean, ds.std, Batching(40, dtype=torch.float64))
        # the grid folds the re-estimated BatchNorm into the weights: equal to float64 rounding
        assert grid.values[f"{split}/loss"][0, 0] == pytest.approx(ref.loss, rel=1e-13)
        assert grid.values[f"{split}/accuracy"][0, 0] == ref.accuracy


def test_pca_directions_are_orthonormal_and_a_planar_path_is_projected_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    last = {"w": torch.randn(30, generator=gen, dtype=torch.float64), "n": torch.tensor(3)}
    u, v = torch.randn(30, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
    coeffs = [(-2.0, 1.0), (-1.5, 0.2), (-0.7, 0.9), (-0.2, -0.3)]
    states = [{"w": last["w"] + a * u + b * v, "n": torch.tensor(i)} for i, (a, b) in enumerate(coeffs)] + [last]
    plane = trajectory_plane(states, [f"e{i}" for i in range(5)], ["w"])
    d1, d2 = plane.d1["w"], plane.d2["w"]
    assert float(d1 @ d2) == pytest.approx(0.0, abs=1e-12)
    assert float(d1.norm()) == pytest.approx(1.0, rel=1e-12) and float(d2.norm()) == pytest.approx(1.0, rel=1e-12)
    for i, state in enumerate(states):
        rebuilt = plane.path[i, 0] * d1 + plane.path[i, 1] * d2
        torch.testing.assert_close(rebuilt, state["w"] - last["w"], rtol=0, atol=1e-12)
    assert sum(plane.provenance["explained_variance_ratio"]) == pytest.approx(1.0, rel=1e-12)
    assert plane.path[0, 0] <= 0 and plane.marks["e4"] == (0.0, 0.0)
    with pytest.raises(DirectionError, match="at least 3"):
        trajectory_plane(states[-2:], ["a", "b"], ["w"])


def test_surface_command_writes_records_and_resumes_after_a_kill(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    full = results.load_grid(run(_req([a], tmp_path / "full.h5", x="-1:1:3", y="-0.5:0.5:2")))
    assert full.shape == (3, 2) and full.complete and full.axes == ("x", "y")
    directions = json.loads(full.attrs["directions"])
    assert directions == {"kind": "random", "seeds": [0, 1], "norm": "filter", "ignore": "bn-and-bias"}
    config = full.config
    assert config["bn"] == "recompute" and config["dtype"] == "float32" and full.attrs["bn_policy"] == "recompute"
    assert json.loads(full.attrs["sha256"]) == [ck.sha256_file(a)]
    assert json.loads(full.attrs["request"])["norm"] == "filter"

    killed_after_points(monkeypatch, 4, lambda: run(_req([a], tmp_path / "part.h5", x="-1:1:3", y="-0.5:0.5:2")))
    assert results.load_grid(tmp_path / "part.h5").done.sum() == 4
    resumed = results.load_grid(run(_req([a], tmp_path / "part.h5", x="-1:1:3", y="-0.5:0.5:2", resume=True)))
    for key in results.POINT_FIELDS:
        np.testing.assert_array_equal(resumed.values[key], full.values[key])
    with pytest.raises(results.ResultsError, match=r"norm.*'filter'.*'layer'"):
        run(_req([a], tmp_path / "part.h5", x="-1:1:3", y="-0.5:0.5:2", resume=True, norm="layer"))

    # a curve file of other settings at --out is refused, never overwritten
    from minima.studies.interpolate import SweepRequest
    from minima.studies.interpolate import run as run_curve

    curve = run_curve(SweepRequest(checkpoint_a=a, checkpoint_b=a, alphas="0,1", out=tmp_path / "c.h5",
                                   device="cpu", plot=False, progress=False))
    with pytest.raises(results.ResultsError, match="another grid"):
        run(_req([a], curve, resume=True))
    with pytest.raises(FileExistsError, match="exists and is complete"):
        run(_req([a], curve))
    assert results.load_curve(curve).complete


def test_surface_bad_input_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds)
    wide = toy_checkpoint(tmp_path / "wide.pt", 3, ds, widths=(7,))
    out = str(tmp_path / "s.h5")
    cases = [
        ([str(a), str(b)], "for the segment between two use python -m minima.interpolate"),
        ([str(a), str(b), str(wide)], r"net.1.weight: shape \(6, 48\) vs \(7, 48\)"),
        ([str(a), "--x", "0:1"], "x grid '0:1' must be START:STOP:NUM"),
        ([str(a), "--y", "1,1"], "y grid '1,1' repeats a value"),
        (["--trajectory", str(a), str(b)], "at least 3 checkpoints"),
        ([str(a), "--max-minutes", "1e-9"], "pass --yes to run it anyway"),
        ([str(a), str(a), str(b)], "hold the same weights"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", out, "--no-progress", "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip()
        first, *listed = err.splitlines()  # one line, plus the differing keys when architectures differ
        assert first.startswith("[minima.surface] error: ") and re.search(message, err), (argv, err)
        assert all(line.startswith("  - ") for line in listed) and "Traceback" not in err, err
    assert main([str(a), "--max-minutes", "1e-9", "--yes", "--out", out, "--no-progress", "--no-plot",
                 "--x", "-1:1:2", "--y", "0", "--device", "cpu"]) == 0


def _toy_run(tmp_path: Path, name: str, seed: int) -> Path:
    config = TrainConfig(model="mlp", model_kwargs={"widths": [8]}, data="synthetic", train_subset=256,
                         test_subset=64, epochs=3, batch_size=64, seed=seed, save_every=1, out=str(tmp_path / name),
                         progress=False)
    train(config, dataset=data.load_source("synthetic").subset(256, 64, 0))
    return tmp_path / name


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_trajectory_surface_from_a_training_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = _toy_run(tmp_path, "run", 0)
    epochs = sorted(run_dir.glob("epoch_*.pt"))
    assert len(epochs) == 3
    out = tmp_path / "traj.h5"
    assert main(["--trajectory", *map(str, epochs), "--out", str(out), "--no-progress", "--device", "cpu",
                 "--train-subset", "64", "--test-subset", "32"]) == 0
    grid = results.load_grid(out)
    path = np.array(json.loads(grid.attrs["path"]))
    assert path.shape == (3, 2) and path[-1].tolist() == [0.0, 0.0] and grid.shape == (21, 21)
    x, y = grid.coords["x"], grid.coords["y"]
    assert x.min() < path[:, 0].min() and x.max() > path[:, 0].max() and y.min() <= path[:, 1].min()
    ratios = json.loads(grid.attrs["directions"])["explained_variance_ratio"]
    assert ratios[0] >= ratios[1] > 0 and sum(ratios) <= 1 + 1e-12
    assert_drawn(out.with_suffix(".png"))
    other = _toy_run(tmp_path, "other", 1)
    mixed = [*map(str, epochs[:2]), str(other / "epoch_0003.pt")]
    assert main(["--trajectory", *mixed, "--out", str(tmp_path / "m.h5"), "--no-progress"]) == 2
    assert "mixes training runs" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter
def test_plotting_a_surface_never_imports_the_models(tmp_path: Path) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    grid = run(_req([a], tmp_path / "g.h5"))
    code = ("import sys; from minima.plot import main; rc = main(sys.argv[1:]); "
            "assert 'minima.models' not in sys.modules and 'minima.files.checkpoint' not in sys.modules, "
            "sorted(sys.modules);"
            " sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(grid), "--out", str(tmp_path / "g.png")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert_drawn(tmp_path / "g.png")


@pytest.mark.slow
def test_two_rank_surface_equals_one_rank(tmp_path: Path) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    one = results.load_grid(run(_req([a], tmp_path / "one.h5")))
    mp.spawn(rank_worker, args=(free_port(), run, _req([a], tmp_path / "two.h5")), nprocs=2, join=True)
    two = results.load_grid(tmp_path / "two.h5")
    for key in ("train/loss", "test/loss"):
        np.testing.assert_allclose(two.values[key], one.values[key], rtol=1e-6)
    for key in ("train/accuracy", "test/accuracy", "test/nonfinite"):
        np.testing.assert_array_equal(two.values[key], one.values[key])


def test_plot_overlays_curves_and_refuses_mixing_a_plane(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from minima.plot import main as plot_main
    from minima.studies.interpolate import SweepRequest
    from minima.studies.interpolate import run as run_curve

    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds)
    curves = [run_curve(SweepRequest(checkpoint_a=c, direction="random", alphas="-1:1:5", out=tmp_path / f"{c.stem}.h5",
                                     device="cpu", plot=False, progress=False)) for c in (a, b)]
    assert plot_main([*map(str, curves)]) == 0
    assert_drawn(tmp_path / "overlay.png")
    from minima.figures import curve_label

    assert [curve_label(results.load_curve(c)) for c in curves] == ["a", "b"]  # the legend names each checkpoint
    plane = run(_req([a], tmp_path / "p.h5"))
    assert plot_main([str(curves[0]), str(plane)]) == 2
    assert "curves overlay curves and planes overlay planes" in capsys.readouterr().err
