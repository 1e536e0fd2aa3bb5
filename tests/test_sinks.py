"""Tracking sinks (``--log``): what a run records, read back with each tracker's own reader; a missing package is one
line naming the extra."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from minima.files.rundir import RunDir
from minima.files.sinks import check_sinks
from minima.studies.train import train
from tests.test_train import _sgd_config, _toy_data


def _probed(tmp_path: Path, sink: str) -> RunDir:
    config = _sgd_config(tmp_path / sink, epochs=3, batch_size=8, eval_test=True, log=(sink,),
                         probe=("hessian:4",), probe_subset=16)
    train(config, dataset=_toy_data(32))
    return RunDir(tmp_path / sink)


def test_tensorboard_events_read_back_equal_the_run_directory(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _probed(tmp_path, "tensorboard")
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    rows = run.metrics()
    for tag, key in (("train/loss", "train_loss"), ("test/accuracy", "test_accuracy"), ("lr", "lr")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 events
    probes = run.probes()["hessian"]
    assert [s.step for s in events.Scalars("probe/hessian")] == list(probes["step"])
    assert [s.value for s in events.Scalars("probe/hessian")] == pytest.approx(list(probes["value"]), rel=1e-6)
    assert [s.value for s in events.Scalars("probe/hessian_threshold")] == pytest.approx(
        list(probes["threshold"]), rel=1e-6)


@pytest.mark.slow  # W&B starts a service process of its own
def test_wandb_offline_writes_its_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    run = _probed(tmp_path, "wandb")
    found = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1 and found[0].stat().st_size > 0
    assert RunDir(run.path).status().state == "complete"


@pytest.mark.slow  # kept out of the one-minute fast suite
def test_mlflow_file_store_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = _probed(tmp_path, "mlflow")
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # restored after the sink's calls
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the reader's opt-in to MLflow 3's file store
    client = mlflow.MlflowClient(tracking_uri=(run.path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("minima")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["batch_size"] == "8"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    rows = run.metrics()
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["train_loss"], rel=1e-12))
                                                         for r in rows]


def test_a_missing_or_unknown_sink_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ValueError, match=r"--log wandb needs the wandb package: pip install 'minima\[wandb\]'"):
        check_sinks(("wandb",))
    with pytest.raises(ValueError, match="unknown tracking sink"):
        check_sinks(("comet",))
