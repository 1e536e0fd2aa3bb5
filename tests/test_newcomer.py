"""What a newcomer meets: outputs beside their inputs, no file left by a failed command, no silent clamp of a
request, a sharpness table that names its settings, and a hint for a misspelled flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from minima.interpolate import main as interpolate_main
from minima.sharpness import main as sharpness_main
from minima.surface import main as surface_main

from .helpers import toy_checkpoint, toy_dataset


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, Path]:
    ds = toy_dataset()
    runs = tmp_path / "runs"
    runs.mkdir()
    return toy_checkpoint(runs / "a.pt", 1, ds), toy_checkpoint(runs / "b.pt", 2, ds)


def test_default_outputs_go_beside_the_first_checkpoint(ckpts: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = ckpts
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fast = ["--device", "cpu", "--no-progress", "--no-plot"]
    assert surface_main([str(a), "--x", "0,1", "--y", "0,1", *fast]) == 0
    assert sharpness_main([str(a), str(b), "--metrics", "average", "--average-samples", "2", "--device", "cpu"]) == 0
    assert sharpness_main([str(b), "--metrics", "average", "--average-samples", "2", "--device", "cpu"]) == 0
    assert {p.name for p in a.parent.iterdir()} >= {"a_surface.h5", "a_b_sharpness.h5", "b_sharpness.h5"}
    assert not list(cwd.iterdir()), "a command wrote into the working directory"


def test_a_failed_command_leaves_no_new_file(ckpts: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    a, b = ckpts
    import minima.studies.grid as grid

    def broken(*args: object, **kwargs: object) -> dict:
        raise ValueError("evaluation failed on purpose")

    monkeypatch.setattr(grid, "evaluate_point", broken)
    out = tmp_path / "line.h5"
    assert interpolate_main([str(a), str(b), "--alphas", "0,1", "--out", str(out), "--device", "cpu"]) == 2
    assert "evaluation failed on purpose" in capsys.readouterr().err and not out.exists()

    import minima.curvature.registry as registry

    average = registry.REGISTRY["average"]
    monkeypatch.setitem(registry.REGISTRY, "average", type(average)(**{**average.__dict__, "compute": broken}))
    out = tmp_path / "s.h5"
    assert sharpness_main([str(a), "--metrics", "average", "--out", str(out), "--device", "cpu"]) == 2
    assert not out.exists()


def test_a_subset_larger_than_the_data_is_refused_not_clamped(ckpts: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    a, b = ckpts  # trained on 96 training and 48 test images
    argv = [str(a), str(b), "--alphas", "0,1", "--out", str(tmp_path / "c.h5"), "--device", "cpu"]
    assert interpolate_main([*argv, "--train-subset", "500"]) == 2
    err = capsys.readouterr().err
    assert "asked for a train subset of 500 images but the train split has 96" in err and "Traceback" not in err
    assert not (tmp_path / "c.h5").exists()
    assert interpolate_main([*argv, "--train-subset", "96", "--test-subset", "48", "--no-plot"]) == 0  # all: fine


def test_the_sharpness_table_names_the_settings_of_every_column(ckpts: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    a, b = ckpts
    out = tmp_path / "s.h5"
    base = ["--metrics", "average", "--average-samples", "2", "--out", str(out), "--device", "cpu"]
    assert sharpness_main([str(a), *base]) == 0
    assert sharpness_main([str(b), *base, "--bn-mode", "batch", "--train-subset", "30"]) == 0
    capsys.readouterr()
    assert sharpness_main(["--show", str(out)]) == 0
    table = capsys.readouterr().out
    assert "a: bn_mode=eval, train_samples=96" in table and "b: bn_mode=batch, train_samples=30" in table
    assert "measured with different settings" in table
    # a re-run that computes nothing says so instead of "wrote"
    assert sharpness_main([str(a), *base]) == 0
    assert "nothing to compute: every result is already in" in capsys.readouterr().out
    # the hint minima.plot gives for a sharpness file works
    from minima.plot import main as plot_main

    assert plot_main([str(out)]) == 2
    assert f"python -m minima.sharpness --show {out}" in capsys.readouterr().err


def test_a_misspelled_flag_gets_the_nearest_real_one(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        interpolate_main(["a.pt", "b.pt", "--eval-batchsize", "10"])
    assert exit_info.value.code == 2
    assert "did you mean --eval-batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        surface_main(["a.pt", "--no-yes"])  # an action asked for has no negative form
    assert "did you mean --yes" in capsys.readouterr().err


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_loss_landscape_surface_files_round_trip_and_plot(tmp_path: Path) -> None:
    """A file in loss-landscape's layout — built here as their code fills it: values in ``np.meshgrid(x, y)`` order
    under the shape (nx, ny), accuracy in percent, −1 not computed — reads as the [x, y] grid, draws, and a minima
    plane written back in that layout reads as itself."""
    import h5py
    import numpy as np

    from minima.files import landscape
    from minima.plot import main as plot_main

    from .helpers import assert_drawn

    x, y = np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)
    xx, yy = np.meshgrid(x, y)  # their order: (ny, nx)
    loss = 1 + xx**2 + 2 * yy**2
    theirs = tmp_path / "ll.h5"
    with h5py.File(theirs, "w") as f:
        f["dir_file"] = "resnet56_directions.h5"
        f["xcoordinates"], f["ycoordinates"] = x, y
        flat = loss.ravel().copy()
        flat[5] = -1  # a point their code has not computed yet
        f["train_loss"] = flat.reshape(len(x), len(y))  # declared (nx, ny), filled in meshgrid order
        f["train_acc"] = (100 - 10 * loss).ravel().reshape(len(x), len(y))
    grid = landscape.load(theirs)
    assert grid.axes == ("x", "y") and grid.values["train/loss"].shape == (4, 3)
    ix, iy = 2, 1
    assert grid.values["train/loss"][ix, iy] == pytest.approx(1 + x[ix] ** 2 + 2 * y[iy] ** 2)
    assert grid.values["train/accuracy"][ix, iy] == pytest.approx((100 - 10 * loss[iy, ix]) / 100)
    assert np.isnan(grid.values["train/loss"][5 % 4, 5 // 4])  # −1 → not computed
    assert plot_main([str(theirs), "--out", str(tmp_path / "ll.png")]) == 0
    assert_drawn(tmp_path / "ll.png")

    back = tmp_path / "back.h5"
    landscape.save(grid, back)
    with h5py.File(back, "r") as f:  # the layout their code reads: flat index k ↔ (x[k % nx], y[k // nx])
        flat = f["train_loss"][()].reshape(-1)
        assert flat[iy * len(x) + ix] == pytest.approx(1 + x[ix] ** 2 + 2 * y[iy] ** 2) and flat[5] == -1
    again = landscape.load(back)
    np.testing.assert_allclose(again.values["train/loss"], grid.values["train/loss"], equal_nan=True)
    np.testing.assert_allclose(again.values["train/accuracy"], grid.values["train/accuracy"], equal_nan=True)


def test_the_sharpness_estimate_is_printed_and_learns_from_finished_results(ckpts: tuple[Path, Path],
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from minima.curvature.registry import get_metric
    from minima.studies.sharpness import _seconds

    a, _ = ckpts
    assert sharpness_main([str(a), "--metrics", "average,adaptive", "--average-samples", "2", "--out",
                           str(tmp_path / "s.h5"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 result(s) to compute, estimated " in out and "1/2 done, about " in out and "done in " in out
    unit = {"f": 0.5, "grad": 1.5, "hvp": 2.0}
    average, adaptive = get_metric("average"), get_metric("adaptive")
    jobs = [(average, "average_sigma0.01", {"sigma": 0.01, "samples": 3}),
            (adaptive, "adaptive_rho0.05", {"rho": 0.05, "steps": 4})]
    assert _seconds(jobs, unit) == pytest.approx(4 * 0.5 + 5 * 1.5)  # samples + 1 values, steps + 1 gradients
    # a measured ratio scales its own kind only (kinds differ: a line search is not a Lanczos step)
    assert _seconds(jobs, unit, {"average_sigma": 2.0}) == pytest.approx(2 * 4 * 0.5 + 5 * 1.5)
    assert _seconds(jobs[1:], unit, {"average_sigma": 2.0, "keskar_full_eps": 8.0}) == pytest.approx(5 * 1.5)


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_a_plane_from_a_loss_landscape_direction_file_and_the_overlay(ckpts: tuple[Path, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """``--directions`` reads loss-landscape's xdirection/ydirection (weights: one tensor per parameter): the plane's
    point (x, y) is θ + x·d1 + y·d2 with exactly those tensors; minima.plot overlays it on their surface file; a
    direction file of another architecture is one line."""
    import h5py
    import numpy as np
    import torch

    from minima.files import checkpoint as ck
    from minima.files import landscape
    from minima.plot import main as plot_main
    from minima.studies.surface import SurfaceRequest, _inputs

    from .helpers import assert_drawn

    a, _ = ckpts
    model = ck.load_model(a)[0]
    rng = np.random.default_rng(0)
    dir_file = tmp_path / "dirs.h5"
    with h5py.File(dir_file, "w") as f:  # as net_plotter.write_list writes them, net.parameters() order
        for axis in ("xdirection", "ydirection"):
            group = f.create_group(axis)
            for i, p in enumerate(model.parameters()):
                group.create_dataset(str(i), data=rng.normal(size=tuple(p.shape)).astype(np.float32))
    plane = _inputs(SurfaceRequest(checkpoints=[a], directions=dir_file, device="cpu")).plane
    with h5py.File(dir_file, "r") as f:
        for i, (name, p) in enumerate(model.named_parameters()):
            expected = p.detach().double() + 0.5 * torch.as_tensor(f["xdirection"][str(i)][()]).double() \
                - 0.25 * torch.as_tensor(f["ydirection"][str(i)][()]).double()
            torch.testing.assert_close(plane.point(0.5, -0.25)[name].double(), expected, rtol=1e-6, atol=1e-6)
    ours = tmp_path / "ours.h5"
    assert surface_main([str(a), "--directions", str(dir_file), "--x", "-1:1:4", "--y", "-1:1:3", "--out", str(ours),
                         "--device", "cpu", "--no-progress", "--no-plot"]) == 0
    theirs = tmp_path / "theirs.h5"
    landscape.save(landscape.load_any(ours), theirs)  # their file of the same plane
    assert plot_main([str(theirs), str(ours), "--out", str(tmp_path / "both.png")]) == 0
    assert_drawn(tmp_path / "both.png")
    with h5py.File(dir_file, "r+") as f:
        del f["ydirection"]["0"]
        f["ydirection"].create_dataset("0", data=np.zeros((2, 2), dtype=np.float32))
    assert surface_main([str(a), "--directions", str(dir_file), "--out", str(tmp_path / "bad.h5"), "--device",
                         "cpu"]) == 2
    assert "ydirection/0 has shape (2, 2)" in capsys.readouterr().err and not (tmp_path / "bad.h5").exists()


class _FakeTime:
    """A clock that moves only when images are normalised for a forward pass: 1 ms per image."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("command", ["interpolate", "surface"])
def test_grid_estimates_count_the_work_that_follows(tmp_path: Path, command: str, batchnorm: bool,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The printed estimate against the wall time the command then reports, on a clock that charges every image a
    forward pass sees the same time: the estimate's accounting (points, train + test + BatchNorm re-estimation
    images, the timed batch) must be within 2× of the work done — here exactly, on a fixed tiny workload — without a
    timed test's noise."""
    import re

    from minima.core import cli
    from minima.geometry import evaluate as evaluate_mod
    from minima.studies import grid

    real = evaluate_mod.normalize
    _FakeTime.now = 0.0

    def charged(images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        _FakeTime.now += 1e-3 * images.shape[0]
        return real(images, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "normalize", charged)
    monkeypatch.setattr(grid, "time", _FakeTime)
    monkeypatch.setattr(cli, "time", _FakeTime)
    ds = toy_dataset()  # 96 train / 48 test images; with BatchNorm every point also re-estimates on the 96
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=batchnorm)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, batchnorm=batchnorm)
    if command == "interpolate":
        status = interpolate_main([str(a), str(b), "--alphas", "0:1:4", "--out", str(tmp_path / "l.h5"), "--no-plot",
                                   "--eval-batch-size", "32"])
    else:
        status = surface_main([str(a), "--x", "-1:1:3", "--y", "-1:1:3", "--out", str(tmp_path / "s.h5"),
                               "--no-plot", "--eval-batch-size", "32"])
    assert status == 0
    out = capsys.readouterr().out
    seconds = [float(v) for v in re.findall(r"(?:estimated|done in) ([\d.]+) s", out)]
    assert len(seconds) == 2, out
    estimate, measured = seconds
    # the timed batches of the estimate itself are part of the measured time: 3 batches of 32 images
    assert 0.5 <= estimate / measured <= 2.0, (estimate, measured)
    assert estimate == pytest.approx(measured - 3 * 32e-3, rel=0.05, abs=0.05)


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_density_results_are_drawn_and_the_trace_methods_recorded(ckpts: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from minima.files import results
    from minima.plot import main as plot_main

    from .helpers import assert_drawn

    a, b = ckpts
    out = tmp_path / "d.h5"
    base = ["--metrics", "density", "trace", "--density-probes", "2", "--density-steps", "8", "--trace-method",
            "hutchpp", "--trace-max-probes", "12", "--out", str(out), "--device", "cpu"]
    assert sharpness_main([str(a), str(b), *base]) == 0
    rows = {(r["checkpoint_label"], r["metric"]): r for r in results.load_sharpness(out)}
    dens = rows[("a", "density_m8_probes2")]
    assert dens["weights"].sum() == pytest.approx(1.0) and set(dens["probe"]) == {0, 1}
    assert dens["value"] == pytest.approx(dens["nodes"].max())
    assert rows[("b", "trace_hutchpp")]["hvps"] == 12
    capsys.readouterr()
    assert plot_main([str(out)]) == 0
    assert_drawn(tmp_path / "d_density.png")


def test_a_missing_input_is_named_before_any_output_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint in a folder that does not exist: the commands name the checkpoint, not the output folder
    beside it."""
    from minima.align import main as align_main
    from minima.curve import main as curve_main

    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    missing = tmp_path / "no_such_folder" / "b.pt"
    for main, args in ((interpolate_main, [str(missing), str(a)]), (interpolate_main, [str(a), str(missing)]),
                       (align_main, [str(a), str(missing)]), (curve_main, [str(missing), str(a)])):
        assert main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {missing} does not exist" in err and "output directory" not in err, err


def test_plot_points_the_right_way_for_a_checkpoint_and_a_pipeline_folder(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """``minima.plot curve.pt`` said "may be corrupt"; ``minima.plot`` on a pipeline's folder said it "holds no
    probes.h5" although its runs hold theirs."""
    from minima.files import timeline
    from minima.plot import main as plot_main

    ds = toy_dataset()
    ckpt = toy_checkpoint(tmp_path / "curve.pt", 1, ds)
    assert plot_main([str(ckpt)]) == 2
    assert "is a checkpoint, not a result file" in capsys.readouterr().err
    run = tmp_path / "pipeline" / "seed0" / "sb"
    run.mkdir(parents=True)
    timeline.create(run / "probes.h5", {"subset": {"n": 1, "seed": 0}})
    assert plot_main([str(tmp_path / "pipeline")]) == 2
    err = capsys.readouterr().err
    assert "is not a training run; it holds 1 run(s) with a probe timeline" in err and str(run) in err


def test_output_a_person_can_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 30 item 8: the epoch line every --print-every epochs (and the last); align says how many units moved;
    --show orders columns and rows as a person counts (net.2 before net.10)."""
    from minima.align import main as align_main
    from minima.files.naming import natural_key
    from minima.studies.train import TrainConfig, train

    ds = toy_dataset()
    train(TrainConfig(model="mlp", model_kwargs={"input_shape": list(ds.image_shape), "widths": [4]}, epochs=5,
                      batch_size=8, optimizer="sgd", lr=0.1, device="cpu", progress=False, eval_test=False,
                      print_every=2, out=str(tmp_path / "run")), dataset=ds)
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert printed == ["2/5", "4/5", "5/5"]
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6,))
    assert align_main([str(a), str(a), "--out", str(tmp_path / "same.pt"), "--device", "cpu"]) == 0
    assert "0 of 6 units moved: B already matches A" in capsys.readouterr().out
    assert sorted(["hessian@net.10", "hessian@net.2", "epoch_0010", "epoch_0009"], key=natural_key) == [
        "epoch_0009", "epoch_0010", "hessian@net.2", "hessian@net.10"]


def test_help_texts_name_every_input_and_group_metric_flags(capsys: pytest.CaptureFixture) -> None:
    """Issue 30 item 9: plot names what it draws, sharpness lists --show and each metric's flags under the metric,
    curve lists --align-method's choices and says --resume also resumes the training."""
    from minima.curve import main as curve_main
    from minima.plot import main as plot_main

    def help_of(main: Any) -> str:
        with pytest.raises(SystemExit):
            main(["--help"])
        return " ".join(capsys.readouterr().out.split())

    plot = help_of(plot_main)
    for what in ("minima.interpolate", "minima.surface", "minima.curve", "loss-landscape", "sharpness files",
                 "training run's folder"):
        assert what in plot, what
    sharp = help_of(sharpness_main)
    assert "--show FILE.h5 print a results file's table" in sharp
    adaptive = sharp.index("metric adaptive:")
    assert adaptive < sharp.index("--rho FLOAT box radius") < sharp.index("metric average:") < sharp.index(
        "--sigma FLOAT noise scale")
    curve = help_of(curve_main)
    assert "--align-method {weights,activations}" in curve and "continue an interrupted curve training" in curve
