"""The zoo (``minima.pipelines``, ``python -m minima.zoo``): a study validated whole, runs named by their hash, shards
disjoint and complete, the local pool, a failing run recorded, kill-and-restart ending with the same table, Slurm
through submitit (its debug executor end to end, a fake ``sbatch`` for the script), USR2 under submitit."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minima.files import checkpoint as ck
from minima.files.rundir import RunDir
from minima.pipelines.runs import complete, run_one, zoo_state
from minima.pipelines.study import load_study, parse_shard, run_hash, shard
from minima.pipelines.zoo import ZooRequest, submit_slurm, zoo
from minima.studies.train import TrainConfig, TrainingInterrupted, train
from tests.test_train import _sgd_config, _toy_data

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name = "tiny"
seeds = [0]

[train]
model = "mlp"
model_kwargs = {{ input_shape = [3, 32, 32], widths = [8] }}
data = "synthetic"
train_subset = 64
test_subset = 32
epochs = 2
optimizer = "sgd"
eval_batch_size = 64

[grid]
lr = [0.01, 0.05]
batch_size = [16, 32]
{extra}
[measure]
metrics = ["average"]
average_samples = 2
train_subset = 32
"""


def _study(tmp_path: Path, extra: str = "", name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(STUDY.format(extra=extra))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_study_is_validated_whole_with_the_key_named(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path), tmp_path / "pool")
    assert [r.params for r in study.runs] == [{"lr": lr, "batch_size": b, "seed": 0} for lr in (0.01, 0.05)
                                              for b in (16, 32)]
    assert study.varied == ["lr", "batch_size", "seed"]
    assert all(r.directory == tmp_path / "pool" / r.run for r in study.runs)
    base = STUDY.format(extra="")
    bad = {
        base.replace("batch_size = [16, 32]", "batch_size = [16, 32]\nlrr = [0.1]"): "unknown key 'lrr'; did you mean",
        STUDY.format(extra="[[variants]]\noptimiser = 'adam'"): "unknown key 'optimiser'; did you mean 'optimizer'",
        base.replace("[grid]", "[grid2]"): "unknown key 'grid2'; did you mean 'grid'",
        STUDY.format(extra="[[variants]]\nepochs = 0"): "epochs must be ≥ 1",
        STUDY.format(extra="[[variants]]\nseed = 3"): "seeds = ",
        STUDY.format(extra="[[variants]]\nout = 'x'"): "'out' is chosen by the zoo",
    }
    for text, message in bad.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_study(path, tmp_path / "pool")
    path = tmp_path / "measure.toml"
    path.write_text(STUDY.format(extra="").replace("average_samples", "average_sample"))
    with pytest.raises(ValueError, match="did you mean 'average_samples'"):
        load_study(path, tmp_path / "pool")
    path.write_text(STUDY.format(extra="").replace('["average"]', '["hesian"]'))
    with pytest.raises(ValueError, match=r"\[measure\].*hesian"):
        load_study(path, tmp_path / "pool")
    path.write_text(STUDY.format(extra="[[variants]]\noptimizer = 'sgd'\n[[variants]]\noptimizer = 'sgd'\n"))
    with pytest.raises(ValueError, match="same run as run 0"):
        load_study(path, tmp_path / "pool")


def test_a_run_is_named_by_what_it_computes(tmp_path: Path) -> None:
    """The hash ignores how a run is executed (out, threads, progress) and sees every setting that changes numbers;
    two studies declaring the same run share its directory."""
    config = _sgd_config(tmp_path / "a")
    assert run_hash(config) == run_hash(replace(config, out="elsewhere", threads=7, progress=True))
    # pinned: the hashes of fc45d42, before the SAM/SWA settings existed — a grown request keeps a zoo's runs
    assert run_hash(TrainConfig()) == "f74c84679050"
    assert run_hash(TrainConfig(model="mlp", lr=0.25, batch_size=64, optimizer="sgd")) == "22d97eb0b439"
    assert run_hash(TrainConfig(optimizer="sam")) != run_hash(TrainConfig(optimizer="sam", sam_rho=0.1))
    assert run_hash(config) != run_hash(replace(config, lr=0.25))
    one = load_study(_study(tmp_path), tmp_path / "pool")
    other = _study(tmp_path, name="other.toml")
    other.write_text(other.read_text().replace("lr = [0.01, 0.05]", "lr = [0.05]"))
    two = load_study(other, tmp_path / "pool")
    assert {r.run for r in two.runs} < {r.run for r in one.runs}


def test_shards_are_disjoint_and_complete(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path), tmp_path / "pool")
    for n in (1, 2, 3, 5):
        parts = [{r.run for r in shard(study.runs, k, n)} for k in range(1, n + 1)]
        assert set().union(*parts) == {r.run for r in study.runs}
        assert sum(len(p) for p in parts) == len(study.runs)
    for text in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(text)


@pytest.mark.slow  # worker processes
def test_four_runs_on_two_local_workers_then_nothing_to_do(tmp_path: Path) -> None:
    path = _study(tmp_path)
    req = ZooRequest(study=path, out=str(tmp_path / "study"), workers=2, threads=1)
    lines: list[str] = []
    counts = zoo(req, lines.append)
    assert counts["complete"] == 4, lines
    rows = _rows(tmp_path / "study" / "runs.csv")
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert list(rows[0])[:5] == ["run", "index", "lr", "batch_size", "seed"]
    for r in rows:
        assert r["status"] == "complete" and r["reason"] == "epoch cap 2" and r["epochs"] == "2"
        assert float(r["average_sigma0.01"]) == float(r["average_sigma0.01"])  # measured, a number
        assert 0 <= float(r["test_accuracy"]) <= 1 and float(r["train_loss"]) > 0
    steps = {(r["batch_size"]): r["steps"] for r in rows}
    assert steps == {"16": "8", "32": "4"}
    finals = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").glob("*/final.pt")}
    assert len(finals) == 4
    again: list[str] = []
    zoo(req, again.append)
    assert any("nothing to do" in line for line in again)
    assert finals == {p: p.stat().st_mtime_ns for p in finals}
    status: list[str] = []
    zoo(replace(req, status=True), status.append)
    assert "4 complete" in status[0]
    (tmp_path / "study" / "runs" / rows[1]["run"] / "evaluation.json").unlink()  # one run left to evaluate
    plan: list[str] = []
    zoo(replace(req, dry_run=True), plan.append)
    assert "3 complete, 1 running" in plan[0] and "1 to do" in plan[0]
    assert re.match(r"\[minima.zoo\] estimated .+ for 1 run\(s\) .* \(from 4 earlier run\(s\)", plan[1]), plan
    assert any(line.split()[2] == rows[1]["run"] and "running" in line for line in plan[2:]), plan
    assert not (tmp_path / "study" / "runs" / rows[1]["run"] / "evaluation.json").exists()  # a dry run computes nothing


def test_a_failing_and_a_diverging_run_are_recorded_and_stop_nothing(tmp_path: Path) -> None:
    """In this process (run_one is what every worker calls): the failing run's reason is recorded, the study goes
    on, a diverged run counts as finished (its outcome is a result), a failed one is retried."""
    path = _study(tmp_path, extra="[[variants]]\nprobe = ['hessian']\nprobe_subset = 100000\n"
                                  "[[variants]]\nschedule = 'step'\nmilestones = [1]\ngamma = 1e30\n")
    study = load_study(path, tmp_path / "pool")
    failed = run_one(study.runs[0], study)
    assert failed["state"] == "failed" and "probe-subset 100000" in failed["reason"]
    assert zoo_state(study.runs[0], study)[0] == "failed" and not complete(study.runs[0], study)
    assert not (study.runs[0].directory / "status.json").exists()  # the training never started
    diverged = run_one(study.runs[4], study)
    assert diverged["state"] == "diverged" and "NaN/inf in epoch 2" in diverged["reason"]
    assert complete(study.runs[4], study)
    assert "probe-subset" in (study.runs[0].directory / "log.txt").read_text()


def test_a_measurement_that_fails_keeps_the_training_and_is_tried_again(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's own work failing after training (here the measurement) is recorded beside the run, not in the
    training run's status; the next start measures again without training again."""
    from minima.pipelines import runs

    study = load_study(_study(tmp_path), tmp_path / "pool")
    spec = study.runs[0]

    def broken(request: object) -> None:
        raise RuntimeError("the cluster's scratch disk is full")

    monkeypatch.setattr(runs, "measure", broken)
    failed = run_one(spec, study)
    assert failed["state"] == "failed" and failed["reason"] == "RuntimeError: the cluster's scratch disk is full"
    assert RunDir(spec.directory).status().state == "complete"  # the training run's own record is intact
    trained = RunDir(spec.directory).final.stat().st_mtime_ns
    monkeypatch.undo()
    assert run_one(spec, study)["state"] == "complete"
    assert RunDir(spec.directory).final.stat().st_mtime_ns == trained and complete(spec, study)
    assert not (spec.directory / "zoo_error.json").exists()


def test_a_half_written_measurement_file_is_set_aside_and_measured_again(tmp_path: Path) -> None:
    from minima.pipelines.runs import measure_path

    study = load_study(_study(tmp_path), tmp_path / "pool")
    spec = study.runs[0]
    assert run_one(spec, study)["state"] == "complete"
    path = measure_path(spec, study)
    path.write_bytes(path.read_bytes()[:300])  # what a kill in the middle of a write can leave
    assert not complete(spec, study)
    from minima.pipelines.runs import write_table

    (row, *_) = _rows(write_table(study, tmp_path / "runs.csv"))  # the table is still written, that run unmeasured
    assert row["status"] == "running" and row.get("average_sigma0.01", "") == ""
    assert run_one(spec, study)["state"] == "complete" and complete(spec, study)
    assert path.with_name(path.name + ".unreadable").exists()


def test_a_run_a_worker_is_on_is_running_and_its_files_are_not_opened(tmp_path: Path) -> None:
    """While a process holds a run's lock (a worker measuring it), the table and the status leave its files alone —
    opening its measurement file here would make HDF5 refuse the worker's write — and report it running."""
    from minima.pipelines.runs import run_lock, write_table

    study = load_study(_study(tmp_path), tmp_path / "pool")
    spec = study.runs[0]
    assert run_one(spec, study)["state"] == "complete"
    with run_lock(spec.directory):
        assert zoo_state(spec, study)[0] == "running"
        (row, *_) = _rows(write_table(study, tmp_path / "runs.csv"))
        assert row["status"] == "running" and row["train_loss"] == "" and row.get("average_sigma0.01", "") == ""
    (row, *_) = _rows(write_table(study, tmp_path / "runs.csv"))
    assert row["status"] == "complete" and float(row["average_sigma0.01"]) == float(row["average_sigma0.01"])


KILLED_ZOO = """
import sys
from minima.zoo import main
sys.exit(main([{study!r}, "--out", {out!r}, "--workers", "1", "--threads", "1"]))
"""


@pytest.mark.slow  # a zoo killed with SIGKILL after its first complete run, then started again
def test_a_zoo_killed_and_started_again_ends_with_the_same_table(tmp_path: Path) -> None:
    path = _study(tmp_path)
    reference = tmp_path / "reference"
    zoo(ZooRequest(study=path, out=str(reference), workers=2, threads=1), lambda _: None)
    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 — the child writes to it until it is killed
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ZOO.format(study=str(path), out=str(out))], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    study = load_study(path, out / "runs")
    deadline = time.time() + 300
    while not any(complete(r, study) for r in study.runs) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    done = [r for r in study.runs if complete(r, study)]
    assert 1 <= len(done) < 4
    kept = {r.run: RunDir(r.directory).final.stat().st_mtime_ns for r in done}
    zoo(ZooRequest(study=path, out=str(out), workers=2, threads=1), lambda _: None)
    assert kept == {r.run: RunDir(r.directory).final.stat().st_mtime_ns for r in done}  # not trained again
    assert (out / "runs.csv").read_text() == (reference / "runs.csv").read_text()


def test_the_submitit_debug_executor_runs_the_study_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    path = _study(tmp_path)
    from minima.pipelines.zoo import prepare, write_manifest

    study, where, _ = prepare(path, str(tmp_path / "study"), None)
    write_manifest(study, where)
    submit_slurm(study, where, study.runs[:2], parallelism=2, timeout_min=5, partition=None, account=None,
                 cpus_per_task=1, gpus_per_node=0, cluster="debug")
    assert all(complete(r, study) for r in study.runs[:2]) and not complete(study.runs[2], study)


FAKE_SBATCH = """#!/bin/sh
cp "$1" {copy}
echo "Submitted batch job 4242"
"""


def test_slurm_submits_one_array_and_returns_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(FAKE_SBATCH.format(copy=tmp_path / "submitted.sh"))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun to tell it is on a cluster
    (bin_dir / "srun").chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    zoo(ZooRequest(study=_study(tmp_path), out=str(tmp_path / "study"), executor="slurm", slurm_parallelism=2,
                   slurm_time=30, slurm_partition="gpu", slurm_account="lab"), lines.append)
    sent = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-3%2" in sent
    assert "#SBATCH --signal=USR2@90" in sent
    assert "#SBATCH --partition=gpu" in sent and "#SBATCH --account=lab" in sent and "#SBATCH --time=30" in sent
    assert sys.executable in sent
    assert any("submitted Slurm job array 4242" in line for line in lines)
    assert "4242" in (tmp_path / "study" / "manifest.json").read_text()
    status: list[str] = []
    zoo(ZooRequest(study=_study(tmp_path), out=str(tmp_path / "study"), status=True), status.append)
    assert any("Slurm jobs: 4242" in line for line in status)


def test_under_submitit_usr2_stops_training_with_a_bit_exact_resume(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _toy_data(32)
    config = _sgd_config(tmp_path / "ref", epochs=2, batch_size=8)
    reference = ck.load_checkpoint(train(config, dataset=ds))["state_dict"]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")

    def preempt(state: object) -> None:
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)

    out = replace(config, out=str(tmp_path / "preempted"))
    with pytest.raises(TrainingInterrupted, match="signal 12"):
        train(out, dataset=ds, on_step=preempt)
    assert RunDir(tmp_path / "preempted").status().state == "interrupted"
    resumed = ck.load_checkpoint(train(out, dataset=ds, resume=True))["state_dict"]
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k


@pytest.mark.slow  # a fresh interpreter
def test_zoo_help_and_a_bad_study_are_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "minima.zoo", str(tmp_path / "missing.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "missing.toml does not exist" in done.stderr
    assert not (ROOT / "runs" / "zoo" / "missing").exists()


@pytest.mark.parametrize(("name", "runs", "model"), [("generalisation-quick", 16, "mlp"),
                                                     ("generalisation-cpu", 162, "mlp"),
                                                     ("generalisation-paper", 162, "nin")])
def test_the_generalisation_presets_resolve_whole(tmp_path: Path, name: str, runs: int, model: str) -> None:
    """Issue 26's quick, cpu and paper presets are complete requests: every run resolves (and builds its model)
    before anything is trained; the paper preset is Dziugaite et al.'s NiN trained to cross-entropy 0.01."""
    from minima.models import build_model

    study = load_study(Path(__file__).resolve().parents[1] / "experiments" / "studies" / f"{name}.toml",
                       tmp_path / "pool")
    assert len(study.runs) == runs and {r.config.model for r in study.runs} == {model}
    assert {r.config.target_loss for r in study.runs} == {0.01}
    for kwargs in {json.dumps(r.config.model_kwargs or {}, sort_keys=True) for r in study.runs}:
        build_model(model, num_classes=10, **json.loads(kwargs))
