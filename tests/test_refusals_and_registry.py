"""Refusals on every rank (two gloo ranks, three commands), metrics registered in any order or installed as
plugins, a stated num_classes, and data rebuilt from a file's own record."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from minima import data
from minima.models import ModelSpecError, build_model, resolve_model

from .helpers import free_port, toy_checkpoint, toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def _two_ranks(module: str, args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``python -m module args`` as ranks 0 and 1 of a 2-process gloo group (what torchrun sets), each with its
    own output; a hang fails the test through the timeout instead of blocking it."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args, "--device", "cpu"], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("refusals")
    ds = toy_dataset()
    a, b = toy_checkpoint(root / "a.pt", 1, ds), toy_checkpoint(root / "b.pt", 2, ds)
    other = toy_checkpoint(root / "wide.pt", 3, ds, widths=(7,))  # another architecture: mismatched with a
    return a, b, other


def _existing(path: Path) -> Path:
    path.write_bytes(b"")  # an output already there (not a grid file): refused without --resume
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["interpolate-existing", "interpolate-bad-grid", "interpolate-mismatch",
                                  "surface-existing", "surface-bad-grid", "surface-mismatch",
                                  "sharpness-existing", "sharpness-bad-checkpoint", "sharpness-bad-metric"])
def test_a_refusal_exits_2_with_one_line_on_every_rank(case: str, pair: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    a, b, other = (str(p) for p in pair)
    out = tmp_path / "out.h5"
    args = {
        "interpolate-existing": ("minima.interpolate", [a, b, "--alphas", "0,1", "--out", str(out)]),
        "interpolate-bad-grid": ("minima.interpolate", [a, b, "--alphas", "0:1", "--out", str(out)]),
        "interpolate-mismatch": ("minima.interpolate", [a, other, "--alphas", "0,1", "--out", str(out)]),
        "surface-existing": ("minima.surface", [a, "--x", "0,1", "--y", "0,1", "--out", str(out)]),
        "surface-bad-grid": ("minima.surface", [a, "--x", "1,1", "--y", "0,1", "--out", str(out)]),
        "surface-mismatch": ("minima.surface", [a, b, other, "--x", "0,1", "--y", "0,1", "--out", str(out)]),
        "sharpness-existing": ("minima.sharpness", [a, "--metrics", "average", "--out", str(out)]),
        "sharpness-bad-checkpoint": ("minima.sharpness", [str(tmp_path / "missing.pt"), "--out", str(out)]),
        "sharpness-bad-metric": ("minima.sharpness", [a, "--metrics", "nonsense", "--out", str(out)]),
    }[case]
    if case.endswith("existing"):
        _existing(out)
    ranks = _two_ranks(*args, cwd=tmp_path)
    for rank, proc in enumerate(ranks):
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, f"rank {rank} exited {proc.returncode}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, f"rank {rank}: {proc.stderr}"
        # one line (mismatched checkpoints list their differing keys under it, as on one rank)
        assert lines[0].startswith(f"[{args[0]}] error: "), f"rank {rank}: {lines}"
        assert all(line.startswith("  - ") for line in lines[1:]), f"rank {rank}: {lines}"
    assert ranks[0].stderr.split("error: ")[1] == ranks[1].stderr.split("error: ")[1]  # the same reason
    if not case.endswith("existing"):
        assert not out.exists(), "a refused command left a file behind"


@pytest.mark.slow  # a fresh interpreter
def test_a_metric_registered_after_importing_every_module_works(tmp_path: Path) -> None:
    """Registered after ``minima.sharpness`` and the study were imported: its flag parses, its parameter reaches
    the computation from Python and from the command line, and its result is stored."""
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    script = textwrap.dedent(f"""
        import sys
        import minima.sharpness as command
        from minima.studies import sharpness as study
        from minima.files import results
        from minima.curvature.registry import Metric, Param, register

        def compute(obj, x, f0, job, seed):
            _, g = obj.value_and_grad(x)
            return {{"value": float(g.abs().pow(job["p"]).sum() ** (1 / job["p"])), "p": job["p"]}}

        register(Metric(name="gradnorm_late", summary="gradient p-norm", fields=("p",), compute=compute,
                        params=(Param("late_p", float, 2.0, "p of the norm"),),
                        jobs=lambda p: [(f"gradnorm_p{{p['late_p']:g}}", {{"p": p["late_p"]}})]))
        req = study.MeasureRequest(checkpoints=[{str(a)!r}], metrics=("gradnorm_late",), late_p=1.0,
                                   out={str(tmp_path / "py.h5")!r}, device="cpu", dtype="float64")
        study.measure(req)
        rc = command.main([{str(a)!r}, "--metrics", "gradnorm_late", "--late-p", "3", "--out",
                           {str(tmp_path / "cli.h5")!r}, "--device", "cpu", "--dtype", "float64"])
        rows = {{r["metric"]: r for f in ("py.h5", "cli.h5")
                 for r in results.load_sharpness({str(tmp_path)!r} + "/" + f)}}
        print("RESULT", sorted(rows), float(rows["gradnorm_p1"]["value"]), float(rows["gradnorm_p3"]["value"]), rc)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ['gradnorm_p1', 'gradnorm_p3'] "), done.stdout
    p1, p3, rc = last.split("] ")[1].split()
    assert rc == "0"
    # the parameter reached the computation: ‖g‖₁ ≥ ‖g‖₃ for any vector, equal only if one entry is non-zero
    assert float(p1) > float(p3) > 0


def test_an_unknown_metric_parameter_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from minima.sharpness import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.pt"), "--late-q", "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --late-q 3" in capsys.readouterr().err


@pytest.mark.slow
def test_a_metric_installed_as_an_entry_point_plugin(tmp_path: Path) -> None:
    """A fake installed distribution declaring ``[minima.metrics]`` is found by ``python -m minima.sharpness``:
    its metric and flag exist and its result is stored; a broken plugin is one line naming it."""
    site = tmp_path / "site"
    (site / "fake_minima_metric-0.1.dist-info").mkdir(parents=True)
    (site / "fake_minima_metric-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-minima-metric\nVersion: 0.1\n")
    (site / "fake_minima_metric-0.1.dist-info" / "entry_points.txt").write_text(
        "[minima.metrics]\nloss_value = fake_minima_metric:METRIC\n")
    (site / "fake_minima_metric.py").write_text(textwrap.dedent("""
        from minima.curvature.registry import Metric, Param

        def compute(obj, x, f0, job, seed):
            return {"value": f0 * job["scale"], "scale": job["scale"]}

        METRIC = Metric(name="loss_value", summary="the loss times a scale", fields=("scale",), compute=compute,
                        params=(Param("loss_scale", float, 1.0, "factor"),),
                        jobs=lambda p: [("loss_value", {"scale": p["loss_scale"]})])
    """))
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]))
    out = tmp_path / "s.h5"
    done = subprocess.run([sys.executable, "-m", "minima.sharpness", str(a), "--metrics", "loss_value,average",
                           "--loss-scale", "2", "--average-samples", "2", "--out", str(out), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    with h5py.File(out, "r") as f:
        node = f["sharpness/a/loss_value"]
        f0 = float(f["sharpness/a/average_sigma0.01"].attrs["f0"])
        assert float(node.attrs["value"]) == pytest.approx(2 * f0, rel=1e-12)
    (site / "fake_minima_metric.py").write_text("raise RuntimeError('broken on purpose')\n")
    broken = subprocess.run([sys.executable, "-m", "minima.sharpness", str(a), "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "metric plugin 'loss_value'" in broken.stderr and "broken on purpose" in broken.stderr


@pytest.mark.parametrize("name", ["mlp", "torchvision:resnet18", "tests.helpers:plugin_free_mlp"])
def test_a_stated_num_classes_is_accepted_when_it_matches_and_refused_otherwise(name: str) -> None:
    trusted = ("tests.helpers",)
    kwargs = {"input_shape": [3, 4, 4], "widths": [5]} if name != "torchvision:resnet18" else {}
    model = build_model(name, 7, trusted=trusted, **kwargs, num_classes=7)
    x = torch.zeros(2, 3, 32, 32) if name.startswith("torchvision") else torch.zeros(2, 3, 4, 4)
    assert model.eval()(x).shape == (2, 7)
    _, stored = resolve_model(name, 7, trusted=trusted, **kwargs, num_classes=7)
    assert stored["num_classes"] == 7
    with pytest.raises(ModelSpecError, match=r"num_classes=100 but the data has 7 classes"):
        build_model(name, 7, trusted=trusted, **kwargs, num_classes=100)


@pytest.mark.slow  # kept out of the one-minute fast suite
def test_training_a_torchvision_model_with_num_classes_in_its_arguments(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from minima.train import main

    base = ["--model", "torchvision:resnet18", "--data", "synthetic", "--train-subset", "40", "--test-subset",
            "20", "--epochs", "1", "--batch-size", "20", "--device", "cpu", "--no-progress", "--no-eval-test"]
    assert main([*base, "--model-kwargs", '{"num_classes": 10}', "--out", str(tmp_path / "ok")]) == 0
    assert main([*base, "--model-kwargs", '{"num_classes": 100}', "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "num_classes=100 but the data has 10 classes" in err and "Traceback" not in err


def _image_hash(split: data.Split) -> str:
    return hashlib.sha256(split.images.numpy().tobytes() + split.labels.numpy().tobytes()).hexdigest()


def test_a_grid_file_records_the_chain_of_subsets_and_rebuilds_its_images(tmp_path: Path) -> None:
    """A checkpoint trained on a 60-image subset, a curve on 24 of those: the file's own record rebuilds exactly the
    24 images (and a sharpness file's record its images too)."""
    from minima.files import checkpoint as ck
    from minima.files import results
    from minima.interpolate import SweepRequest, run
    from minima.studies.sharpness import MeasureRequest, measure

    full = data.synthetic(n_train=120, n_test=60, image_shape=(3, 4, 4), num_classes=3, seed=1)
    trained_on = full.subset(train=60, test=30, seed=3)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[5])
        meta = ck.make_meta(epoch=1, step=1, global_batch_size=8, world_size=1, seed=seed, train_config={},
                            data=trained_on.describe())
        paths.append(ck.save_checkpoint(ck.make_checkpoint("mlp", {"input_shape": [3, 4, 4], "widths": [5],
                                                                   "num_classes": 3}, model.state_dict(), meta),
                                        tmp_path / f"m{seed}.pt"))
    out = run(SweepRequest(checkpoint_a=paths[0], checkpoint_b=paths[1], alphas="0,1", train_subset=24,
                           subset_seed=5, out=tmp_path / "c.h5", device="cpu", plot=False, progress=False))
    recorded = json.loads(str(results.load_grid(out).attrs["config"]))["data"]
    assert recorded["subset"]["train"] == [{"n": 60, "seed": 3}, {"n": 24, "seed": 5}]
    expected = trained_on.subset(train=24, seed=5)
    rebuilt = data.rebuild(recorded)
    assert _image_hash(rebuilt.train) == _image_hash(expected.train) != _image_hash(full.subset(train=24,
                                                                                              seed=5).train)
    assert _image_hash(rebuilt.test) == _image_hash(expected.test)

    sharp = measure(MeasureRequest(checkpoints=[paths[0]], metrics=("average",), train_subset=12, subset_seed=2,
                                   average_samples=2, out=tmp_path / "s.h5", device="cpu"))
    row = results.load_sharpness(sharp)[0]
    rebuilt = data.rebuild(json.loads(row["data"]))
    assert _image_hash(rebuilt.train) == _image_hash(trained_on.subset(train=12, seed=2).train)


def test_a_grid_file_with_the_older_data_record_still_resumes(tmp_path: Path) -> None:
    """Files written before subset chains record one ``{"n", "seed"}`` per split and no BN subset: resuming them
    with the same settings computes nothing and refuses nothing."""
    from minima.files import results
    from minima.interpolate import SweepRequest, run

    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds)
    req = SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas="0,1", train_subset=30, out=tmp_path / "c.h5",
                       device="cpu", plot=False, progress=False)
    run(req)
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        config = json.loads(f.attrs["config"])
        config["data"]["subset"] = {"train": config["data"]["subset"]["train"][0]}
        del config["data"]["bn_subset"]
        f.attrs["config"] = json.dumps(config)
    expected = {"config": {**{k: v for k, v in config.items() if k != "world_size"},
                           "data": {**config["data"], "subset": {"train": [{"n": 30, "seed": 0}]},
                                    "bn_subset": None}}}
    assert results.pending_points(tmp_path / "c.h5", {"alpha": np.array([0.0, 1.0])}, expected) == []
    expected["config"]["data"]["subset"] = {"train": [{"n": 31, "seed": 0}]}
    with pytest.raises(results.ResultsError, match="data"):
        results.pending_points(tmp_path / "c.h5", {"alpha": np.array([0.0, 1.0])}, expected)


@pytest.mark.slow  # two ranks
def test_align_under_torchrun_works_on_rank_0_and_refuses_on_every_rank(pair: tuple[Path, Path, Path],
                                                                       tmp_path: Path) -> None:
    a, b, _ = (str(p) for p in pair)
    out = tmp_path / "b_aligned.pt"
    ranks = _two_ranks("minima.align", [a, b, "--out", str(out)], cwd=tmp_path)
    assert [p.returncode for p in ranks] == [0, 0], [p.stderr for p in ranks]
    assert "wrote" in ranks[0].stdout and "wrote" not in ranks[1].stdout  # rank 0 did the work, once
    assert out.exists()
    before = out.read_bytes()
    ranks = _two_ranks("minima.align", [a, b, "--out", str(out)], cwd=tmp_path)  # exists, no --overwrite
    for proc in ranks:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("[minima.align] error: ") and "exists" in proc.stderr
    assert out.read_bytes() == before
