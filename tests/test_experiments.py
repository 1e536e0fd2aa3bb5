from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

from experiments import keskar
from minima import data
from minima.files import results, timeline
from minima.geometry.evaluate import evaluate_checkpoint

from .helpers import assert_drawn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_keskar_smoke_pipeline_writes_every_artefact_and_resumes(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out, figs = tmp_path / "run", tmp_path / "figs"
    argv = ["--model", "mlp", "--preset", "smoke", "--out", str(out), "--figures", str(figs)]
    assert keskar.main(argv) == 0
    for regime in ("sb", "lb"):
        for name in ("init.pt", "last.pt", "final.pt", "metrics.jsonl", "config.json"):
            assert (out / "seed0" / regime / name).is_file()
    curve = results.load_curve(out / "seed0" / "sb_vs_lb.h5")
    assert curve.complete and len(curve.alpha) == 5 and curve.attrs["bn_policy"] == "recompute"
    metrics = {r["metric"] for r in results.load_sharpness(out / "seed0" / "sharpness.h5")}
    assert {"keskar_full_eps0.001", "keskar_sub5_seed0_eps0.0005", "hessian_top1"} <= metrics
    assert_drawn(figs / "keskar_mlp.png")
    assert_drawn(figs / "keskar_mlp_curvature.png")
    curvature = {(r["checkpoint_label"], r["metric"]) for r in results.load_sharpness(out / "seed0" / "curvature.h5")}
    for regime in ("sb", "lb"):  # every layer of the toy BN-MLP (16 units) and the whole network's density
        assert {(regime, f"hessian_top1@{b}") for b in ("net.1", "net.2", "net.4")} <= curvature
        assert (regime, "trace_hutchpp@net.4") in curvature and (regime, "density_m6_probes2") in curvature
    table = keskar.parse_summary_table((out / "summary.md").read_text())
    assert set(table["net.2 · BatchNorm 16 (32)"]) != {"nan"}  # the per-layer table: BatchNorm's 16 scales and shifts
    assert set(table["test accuracy (%)"][2:]) == {"—"}  # no paper numbers for the MLP
    # the table reports exactly what the files and checkpoints hold
    stored = {(r["checkpoint_label"], r["metric"]): r for r in results.load_sharpness(out / "seed0" / "sharpness.h5")}
    ds = data.load_source("synthetic").subset(512, 128, seed=0)
    for i, regime in enumerate(("sb", "lb")):
        acc = evaluate_checkpoint(out / "seed0" / regime / "final.pt", {"train": ds.train})["train"].accuracy
        assert table["train accuracy (%)"][i] == f"{100 * acc:.2f}"
        assert table["φ(ε=0.001), full space"][i] == f"{stored[(regime, 'keskar_full_eps0.001')]['phi']:.2f}"
        assert table["λ_max (Hessian, BN batch)"][i] == f"{stored[(regime, 'hessian_top1')]['eigenvalues'][0]:.2f}"
        # Adam's preconditioned λ_max probed every 2 epochs and after the last (3 epochs), as the table reports it
        probed = timeline.load(out / "seed0" / regime / "probes.h5")["preconditioned"]
        assert probed["epoch"].tolist() == [2, 3]
        np.testing.assert_allclose(probed["threshold"], 38.0 / 1e-3)
        assert table["Adam's preconditioned λ_max at the end of training (threshold 38/η = 38000)"][i] == (
            f"{probed['value'][-1]:.0f}")
    # a second run finds every stage complete: no file is rewritten, the recorded compute time is kept
    stamp = (out / "seed0" / "sb_vs_lb.h5").stat().st_mtime_ns
    clock = (out / "stage_seconds.json").read_text()
    assert set(json.loads(clock)) == {"seed0/train_sb", "seed0/train_lb", "seed0/interpolate", "seed0/sharpness",
                                      "seed0/curvature", "seed0/evaluate"}
    compute = re.search(r"compute time ([\d.]+) min", (out / "summary.md").read_text()).group(1)
    calls: list[str] = []  # a re-run computes nothing: no training, grid point, measurement or evaluation

    def counted(name: str):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called on a complete run")
        return call

    import minima.geometry.evaluate as geometry_evaluate
    import minima.pipelines.runs as pipeline_runs
    for module, name in ((keskar, "train"), (keskar, "run_interpolation"), (keskar, "measure"),
                         (keskar, "evaluate_run"), (pipeline_runs, "evaluate"), (geometry_evaluate, "evaluate")):
        monkeypatch.setattr(module, name, counted(name))
    assert keskar.main(argv) == 0
    assert calls == []
    assert (out / "seed0" / "sb_vs_lb.h5").stat().st_mtime_ns == stamp
    assert (out / "stage_seconds.json").read_text() == clock
    assert re.search(r"compute time ([\d.]+) min", (out / "summary.md").read_text()).group(1) == compute


@pytest.mark.slow  # the whole smoke pipeline
def test_the_main_job_writes_only_under_its_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --figures the pipeline touches nothing outside --out (the Quickstart must not modify tracked
    files such as figures/keskar_mlp.png)."""
    monkeypatch.chdir(tmp_path)
    assert keskar.main(["--model", "mlp", "--preset", "smoke", "--out", "run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert_drawn(tmp_path / "run" / "keskar_mlp.png")


def test_summary_parser_reads_paper_columns() -> None:
    md = "| quantity | SB (ours) | LB (ours) | SB (paper) | LB (paper) |\n|---|---|---|---|---|\n" \
         "| test accuracy (%) | 55.00 | 53.40 | 80.04 ± 0.12 | 77.26 ± 0.42 |\n"
    assert keskar.parse_summary_table(md) == {"test accuracy (%)": ["55.00", "53.40", "80.04 ± 0.12", "77.26 ± 0.42"]}


@pytest.mark.slow
def test_notebook_executes_on_a_small_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    assert keskar.main(["--model", "mlp", "--preset", "smoke", "--out", str(out), "--figures", str(tmp_path)]) == 0
    monkeypatch.setenv("MINIMA_CURVES", str(out / "seed0" / "sb_vs_lb.h5"))
    monkeypatch.setenv("MINIMA_SHARPNESS", str(out / "seed0" / "sharpness.h5"))
    from minima.studies.surface import SurfaceRequest
    from minima.studies.surface import run as run_surface

    plane = run_surface(SurfaceRequest(checkpoints=[out / "seed0" / "sb" / "final.pt"], x="-1:1:3", y="-1:1:3",
                                       out=tmp_path / "plane.h5", plot=False, progress=False, device="cpu"))
    monkeypatch.setenv("MINIMA_SURFACE", str(plane))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own (inline) backend, as in Jupyter
    nb = nbformat.read(ROOT / "notebooks" / "explore_curves.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "LB / SB  keskar_full_eps0.001" in text and "d²f/dα²" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3, "every figure cell must display an image (no backend switched behind Jupyter's back)"
    assert "3×3 points, 9 computed" in text
    with h5py.File(out / "seed0" / "sb_vs_lb.h5") as f:
        assert f.attrs["format"] == results.GRID_FORMAT and list(f["coords"]) == ["alpha"]
    # the run folder is a parameter: any training run's folder (no curves there) gets its own small plane
    for name in ("MINIMA_CURVES", "MINIMA_SHARPNESS", "MINIMA_SURFACE"):
        monkeypatch.delenv(name)
    run = tmp_path / "lb_copy"
    shutil.copytree(out / "seed0" / "lb", run)
    monkeypatch.setenv("MINIMA_RUN", str(run))
    nb = nbformat.read(ROOT / "notebooks" / "explore_curves.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs += [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "no curve file in" in text and "7×7 points, 49 computed" in text and (run / "lb_copy_surface.h5").exists()
    assert "Warning" not in text, text  # no TqdmWarning (or any other) in the notebook's output


@pytest.mark.slow
def test_batch_sweep_smoke(tmp_path: Path) -> None:
    from experiments import batch_sweep

    out = tmp_path / "sweep"
    assert batch_sweep.main(["--preset", "smoke", "--out", str(out), "--figures", str(tmp_path)]) == 0
    md = (out / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 16 ") or line.startswith("| 64 ")]
    assert len(rows) == 3  # two batch sizes with warmup, the largest once more without
    assert any("| no |" in r for r in rows)
    assert_drawn(tmp_path / "batch_sweep.png")
    assert "diverged" not in md  # the smoke sweep is seeded and converges
    assert "| vs batch 16 (points) |" in md and sum(" ± " in r for r in rows) == 2  # every row but the base's
    for b in ("b16", "b64", "b64_nowarmup"):
        assert (out / b / "final.pt").is_file() and (out / b / "sharpness.h5").is_file()


@pytest.mark.slow
def test_keskar_seeds_report_mean_and_std(tmp_path: Path) -> None:
    """Two seeds on two shards: each shard runs its seed's stages; the one that finds every stage complete writes
    the summary."""
    out = tmp_path / "two"
    argv = ["--model", "mlp", "--preset", "smoke", "--seeds", "2", "--out", str(out), "--figures", str(tmp_path)]
    assert keskar.main([*argv, "--shard", "2/2"]) == 0
    assert (out / "seed1" / "lb" / "evaluation.json").is_file() and not (out / "seed0").exists()
    assert not (out / "summary.md").exists()
    assert keskar.main([*argv, "--shard", "1/2"]) == 0
    table = keskar.parse_summary_table((out / "summary.md").read_text())
    assert " ± " in table["test accuracy (%)"][0] and " ± " in table["φ(ε=0.001), full space"][1]
    assert (out / "seed1" / "sharpness.h5").is_file()


@pytest.mark.slow
def test_li_surfaces_smoke_writes_planes_curves_and_summary(tmp_path: Path) -> None:
    from experiments import li_surfaces

    out, figs = tmp_path / "li", tmp_path / "figs"
    argv = ["--preset", "smoke", "--keskar-out", str(tmp_path / "k"), "--out", str(out), "--figures", str(figs)]
    assert li_surfaces.main(argv) == 0
    for name in ("sb_random", "lb_random", "x0_sb_lb"):
        grid = results.load_grid(out / f"{name}.h5")
        assert grid.complete and grid.shape == (5, 5)
        assert_drawn(figs / f"li_mlp_{name}.png")
    marks = json.loads(results.load_grid(out / "x0_sb_lb.h5").attrs["marks"])
    assert marks["x0 (sb)"] == [0.0, 0.0] and marks["sb"] == [1.0, 0.0] and marks["lb"][1] > 0  # x0, SB, LB
    summary = json.loads((out / "summary.json").read_text())
    for regime in ("sb_random", "lb_random"):
        grid = results.load_grid(out / f"{regime}.h5")
        loss = grid.values["train/loss"]
        assert summary[regime]["basin_2x"] == pytest.approx(float(np.mean(loss <= 2 * loss[2, 2])))
    assert_drawn(figs / "li_mlp_sb_lb_random_curves.png")
    stamp = (out / "sb_random.h5").stat().st_mtime_ns
    assert li_surfaces.main(argv) == 0  # a re-run recomputes nothing
    assert (out / "sb_random.h5").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_connectivity_smoke_writes_every_table_row_and_resumes(tmp_path: Path) -> None:
    from experiments import connectivity

    out, figs = tmp_path / "conn", tmp_path / "figs"
    argv = ["--preset", "smoke", "--keskar-out", str(tmp_path / "k"), "--out", str(out), "--figures", str(figs)]
    assert connectivity.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [name for name, _, _ in connectivity.VARIANTS] == list(summary["pair"])
    assert len(summary["sb_lb"]) == 3
    for row in (*summary["pair"].values(), *summary["sb_lb"].values()):
        assert row["barrier_train_loss"] >= 0 and 0 <= row["midpoint_test_acc"] <= 100
    pair = summary["pair"]  # every line shares its endpoints: seed 0 and seed 1's function, aligned or not
    for row in pair.values():
        assert row["endpoint_test_acc"] == pytest.approx(pair["naive"]["endpoint_test_acc"], abs=1e-9)
    assert_drawn(figs / "connectivity_smoke.png")
    aligned = torch_load_meta(out / "pair" / "seed1_weights_aligned.pt")
    assert aligned["alignment"]["method"] == "weights"
    md = (out / "summary.md").read_text()
    assert "REPAIR's CIFAR-10 MLP" in md and "Same ordering here" in md and "binomial standard errors over" in md
    # a second run finds every stage complete
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    assert connectivity.main(argv) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}


def torch_load_meta(path: Path) -> dict:
    from minima.files import checkpoint as ck

    return ck.load_checkpoint(path)["meta"]


@pytest.mark.slow
def test_edge_of_stability_smoke(tmp_path: Path) -> None:
    from experiments import edge_of_stability

    out = tmp_path / "eos"
    assert edge_of_stability.main(["--preset", "smoke", "--out", str(out), "--figures", str(tmp_path)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    gd, adam, sam = summary["runs"]
    assert gd["probe"] == "hessian" and adam["probe"] == "preconditioned" and sam["run"].startswith("sam_")
    first, last = sam["sam_threshold_first_last"]  # SAM's edge, from the measured ‖g‖, below its 2/η
    assert sam["edge"] == "λ_SAM" and sam["lr"] == gd["lr"] and last > 0 and first < sam["threshold"]
    assert gd["threshold"] == pytest.approx(1.2 * summary["lambda0"], rel=1e-9)  # 2/η = 1.2 × λ_max(init)
    assert gd["first_value"] == pytest.approx(summary["lambda0"], rel=0.2)  # probed after the first 5 steps
    assert_drawn(tmp_path / "edge_of_stability_smoke.png")
    assert "reaches 0.9·threshold" in (out / "summary.md").read_text()


def test_a_pipeline_stopped_in_any_stage_is_one_line_and_exit_75(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C, SIGTERM or an interrupted training stage: one line saying the same command continues, status 75, no
    traceback; SIGTERM's own handler is back afterwards."""
    import os
    import signal

    from experiments._pipeline import interruptible
    from minima.optim.steps import TrainingInterrupted

    def training_stopped() -> int:
        raise TrainingInterrupted(Path("last.pt"), "stopped by signal 2 after step 3")

    def ctrl_c() -> int:
        raise KeyboardInterrupt

    def sigterm() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    for work in (training_stopped, ctrl_c, sigterm):
        assert interruptible("keskar")(work)() == 75
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "run the same command again to continue" in err[0], err
    assert signal.getsignal(signal.SIGTERM) is before

    def stopped_training(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted(Path("last.pt"), "stopped by signal 2 after step 3")

    monkeypatch.setattr(keskar, "train", stopped_training)  # the pipeline's first training stage is interrupted
    assert keskar.main(["--preset", "smoke", "--data", "synthetic", "--out", str(tmp_path / "k")]) == 75
    said = capsys.readouterr()
    assert "run the same command again to continue" in said.err
    # the whole job's estimate came before the first stage
    assert said.out.index("[experiments.keskar] estimate: about") < said.out.index("stage 1/6: seed0/train_sb")


def test_a_nested_preset_is_checked_before_the_first_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from experiments import connectivity

    preset = tmp_path / "mine.toml"
    preset.write_text('keskar_preset = "mini"\n')
    out = tmp_path / "out"
    assert connectivity.main(["--preset", str(preset), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "keskar_preset = 'mini'" in err and "no preset 'mini'" in err, err
    assert not out.exists()


def test_the_verdict_says_when_a_difference_is_within_its_standard_error() -> None:
    # issue 30's example: 44.70 vs 45.25 % on 2,000 test images, one seed: SE ≈ 1.57 points → not distinguishable
    text = keskar.accuracy_verdict([45.25], [44.70], 2000)
    se = 100 * ((0.4525 * 0.5475 + 0.4470 * 0.5530) / 2000) ** 0.5
    assert "**not distinguishable**" in text and f"0.55 ± {se:.2f} points" in text and "2000 test images" in text
    assert "**yes**" in keskar.accuracy_verdict([55.12], [51.63], 10_000)  # 3.5 points, SE ≈ 0.70
    seeds = keskar.accuracy_verdict([55.0, 55.4, 54.8], [51.0, 51.9, 51.2], 10_000)  # across seeds: their spread
    assert "**yes**" in seeds and "standard error over 3 seeds" in seeds
    assert "**no (LB above SB)**" in keskar.accuracy_verdict([50.0], [55.0], 10_000)


def test_connectivity_and_batch_sweep_verdicts_carry_standard_errors() -> None:
    from experiments import batch_sweep, connectivity
    # REPAIR's own MLP numbers on 10,000 images: every step beyond 2 SE (SE ≈ 0.7 points)
    assert "**yes**" in connectivity.ordering_verdict(36.0, 55.0, 64.0, 65.0, 10_000)
    # a 0.5-point step on 1,000 images (SE ≈ 2.2): not distinguishable, whatever the sign
    text = connectivity.ordering_verdict(40.0, 40.5, 50.0, 52.0, 1000)
    se = 100 * ((0.405 * 0.595 + 0.40 * 0.60) / 1000) ** 0.5
    assert "**not distinguishable**" in text and f"best alignment − naive +0.50 ± {se:.2f}" in text
    assert "**no**" in connectivity.ordering_verdict(60.0, 40.0, 50.0, 52.0, 10_000)  # alignment clearly worse
    assert "**no**" in connectivity.ordering_verdict(30.0, 40.0, 60.0, 52.0, 10_000)  # REPAIR above the ends
    assert "**yes**" in connectivity.ordering_verdict(30.0, 40.0, 52.5, 52.0, 10_000)  # ≤ the ends within noise
    base = {"test_acc": 50.0}
    assert batch_sweep.versus(base, base, 10_000) == "—" and batch_sweep.versus(base, None, 10_000) == "—"
    se = 100 * ((0.5 * 0.5 + 0.49 * 0.51) / 10_000) ** 0.5
    assert batch_sweep.versus({"test_acc": 49.0}, base, 10_000) == f"≈ -1.00 ± {se:.2f}"  # within 2 SE (1.41)
    assert batch_sweep.versus({"test_acc": 45.0}, base, 10_000).startswith("-5.00 ± ")


@pytest.mark.slow  # four trainings, four measurements, two lines and a plane (≈ 40 s)
def test_flat_optimizers_smoke_compares_four_minima_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    from experiments import flat_optimizers as fo
    from minima.files import checkpoint as ck

    out, figs = tmp_path / "fo", tmp_path / "figs"
    assert fo.main(["--preset", "smoke", "--out", str(out), "--figures", str(figs)]) == 0
    configs = {run: ck.load_checkpoint(out / run / "final.pt")["meta"]["train_config"] for run in fo.RUNS}
    assert configs["sam"]["optimizer"] == "sam" and configs["sam"]["sam_rho"] == 0.05
    assert configs["asam"]["optimizer"] == "asam" and configs["asam"]["sam_rho"] == 2.0
    assert configs["swa"]["swa_start"] == 1 and (out / "swa" / "swa.pt").exists()
    inits = [ck.load_checkpoint(out / run / "init.pt")["state_dict"] for run in fo.RUNS]
    assert all(all(torch.equal(i[k], inits[0][k]) for k in i) for i in inits)  # one initial point for all four
    table = json.loads((out / "summary.json").read_text())["runs"]
    for run in fo.RUNS:
        assert {"lambda_max", "trace", "worst_case", "keskar", "test_accuracy"} <= set(table[run]), run
        assert all(np.isfinite(v) for v in table[run].values())
    swa_eval = json.loads((out / "swa" / "evaluation-swa.json").read_text())
    assert swa_eval["test_accuracy"] == pytest.approx(table["swa"]["test_accuracy"])
    marks = json.loads(results.load_grid(out / "plane.h5").attrs["marks"])
    assert list(marks) == ["sgd", "sam", "swa"]
    assert_drawn(figs / "flat_optimizers_smoke.png")
    md = (out / "summary.md").read_text()
    assert md.count("\n| ") == 5 and "Loss barrier on the line SGD → SAM" in md  # header and one row per run

    def fails(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete pipeline ran a stage again")

    for name in ("train", "measure", "align", "run_line", "run_plane", "evaluate_run"):
        monkeypatch.setattr(fo, name, fails)
    assert fo.main(["--preset", "smoke", "--out", str(out)]) == 0


def test_flat_optimizers_refuses_a_bad_plane_before_anything_is_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from experiments import flat_optimizers as fo

    out = tmp_path / "fo"
    assert fo.main(["--preset", "smoke", "plane=[\"sgd\", \"sam\", \"adam\"]", "--out", str(out)]) == 2
    assert "plane must name three different runs" in capsys.readouterr().err and not out.exists()
    assert fo.main(["--preset", "smoke", "train.optimizer=sam", "--out", str(out)]) == 2
    assert "SAM and ASAM are this pipeline's own runs" in capsys.readouterr().err and not out.exists()
