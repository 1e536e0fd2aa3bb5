"""The run directory as a format (``minima.files.rundir``): round trip, the status a run leaves behind (complete,
interrupted, diverged, failed), and directories written before ``status.json`` existed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from minima.files.rundir import RunDir
from minima.studies.train import NonFiniteLossError, TrainingInterrupted, train
from tests.test_train import _sgd_config, _toy_data


def test_a_complete_run_reads_back_through_one_api(tmp_path: Path) -> None:
    ds = _toy_data(32)
    config = _sgd_config(tmp_path / "run", epochs=3, batch_size=8)
    final = train(config, dataset=ds)
    run = RunDir(tmp_path / "run")
    assert run.final == final and run.init.exists() and run.last.exists()
    assert run.config()["batch_size"] == 8 and run.config()["epochs"] == 3
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1] == run.last_metrics()
    assert [r["step"] for r in rows] == [4, 8, 12]
    status = run.status()
    assert (status.state, status.reason, status.epoch, status.step) == ("complete", "epoch cap 3", 3, 12)
    assert status.finished and status.updated
    assert json.loads((run.path / "status.json").read_text())["format"] == "minima.run/1"
    assert run.probes() == {} and run.epoch_checkpoints() == []


def test_metrics_truncate_to_the_resumed_epoch(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "train_loss": 1.0 / epoch})
    run.truncate_metrics(2)
    assert [r["epoch"] for r in run.metrics()] == [1, 2]


def test_a_line_cut_short_by_a_kill_is_not_an_epoch(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 1, "train_loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # killed while appending
    assert run.metrics() == [{"epoch": 1, "train_loss": 1.0}]
    run.truncate_metrics(1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "train_loss": 1.0}\n'
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run.metrics()


def test_a_stopping_rule_is_the_reason_of_a_complete_run(tmp_path: Path) -> None:
    train(_sgd_config(tmp_path / "stop", epochs=50, batch_size=8, lr=0.2, target_loss=0.5), dataset=_toy_data(32))
    status = RunDir(tmp_path / "stop").status()
    assert status.state == "complete" and "target" in status.reason


def test_a_diverged_run_says_so_with_its_reason(tmp_path: Path) -> None:
    config = _sgd_config(tmp_path / "nan", epochs=3, batch_size=8, schedule="step", milestones=(1,), gamma=1e30)
    with pytest.raises(NonFiniteLossError):
        train(config, dataset=_toy_data(32))
    status = RunDir(tmp_path / "nan").status()
    assert status.state == "diverged" and "NaN/inf in epoch 2" in status.reason
    assert status.epoch == 1 and status.finished


def test_a_failed_and_an_interrupted_run_say_so(tmp_path: Path) -> None:
    def boom(state: object) -> None:
        raise RuntimeError("a user hook broke\nsecond line")

    with pytest.raises(RuntimeError):
        train(_sgd_config(tmp_path / "failed", epochs=2, batch_size=8), dataset=_toy_data(32), on_epoch=boom)
    status = RunDir(tmp_path / "failed").status()
    assert (status.state, status.reason, status.epoch) == ("failed", "RuntimeError: a user hook broke", 1)
    assert not status.finished

    def stop(state: object) -> None:
        raise TrainingInterrupted(tmp_path / "int" / "last.pt", "stopped by signal 15 after step 2")

    with pytest.raises(TrainingInterrupted):
        train(_sgd_config(tmp_path / "int", epochs=2, batch_size=8), dataset=_toy_data(32), on_step=stop)
    assert RunDir(tmp_path / "int").status().state == "interrupted"
    # running it again with resume ends complete
    train(replace(_sgd_config(tmp_path / "int", epochs=2, batch_size=8)), dataset=_toy_data(32), resume=True)
    assert RunDir(tmp_path / "int").status().state == "complete"


def test_directories_written_before_status_json_still_read(tmp_path: Path) -> None:
    train(_sgd_config(tmp_path / "run", epochs=2, batch_size=8), dataset=_toy_data(32))
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    (old / "status.json").unlink()
    status = RunDir(old).status()
    assert (status.state, status.epoch, status.step) == ("complete", 2, 8)
    (old / "final.pt").unlink()
    assert RunDir(old).status().state == "interrupted"
    assert RunDir(tmp_path / "nothing").status().state == "new"
    assert RunDir(tmp_path / "nothing").metrics() == [] and RunDir(tmp_path / "nothing").config() == {}


def test_steps_to_a_training_loss_are_read_from_the_epochs(tmp_path: Path) -> None:
    """Jiang et al.'s optimisation measures at epoch resolution: the steps by the end of the first epoch whose
    running training loss reached the target."""
    run = RunDir(tmp_path)
    for epoch, (loss, step) in enumerate([(1.2, 10), (0.3, 20), (0.09, 30), (0.02, 40)], start=1):
        run.append_metrics({"epoch": epoch, "step": step, "train_loss": loss})
    assert run.steps_to_loss(0.1) == 30 and run.steps_to_loss(0.3) == 20 and run.steps_to_loss(0.01) is None
