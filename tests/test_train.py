from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minima import data
from minima.files import checkpoint as ck
from minima.studies.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, plan_batches, train
from minima.train import main

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TOY = {"input_shape": [3, 4, 4], "widths": [8]}


def _toy_data(n_train: int = 16) -> data.Dataset:
    return data.synthetic(n_train=n_train, n_test=8, image_shape=(3, 4, 4), num_classes=3, seed=2)


def _sgd_config(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(model="mlp", model_kwargs=TOY, epochs=1, batch_size=16, optimizer="sgd", lr=0.5,
                       momentum=0.9, device="cpu", eval_test=False, progress=False, out=str(out), seed=3)
    return replace(base, **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(path)["state_dict"]



def _ddp_worker(rank: int, world: int, ports: list[int], configs: list[TrainConfig], ds: data.Dataset) -> None:
    torch.set_num_threads(1)
    for port, config in zip(ports, configs, strict=True):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        train(config, dataset=ds)


@pytest.mark.slow
def test_ddp_and_accumulation_equal_single_process_step(tmp_path: Path) -> None:
    ds = _toy_data(16)
    single = train(_sgd_config(tmp_path / "single"), dataset=ds)
    accumulated = train(_sgd_config(tmp_path / "accum", micro_batch=4), dataset=ds)
    ddp_configs = [_sgd_config(tmp_path / "ddp"), _sgd_config(tmp_path / "ddp_accum", micro_batch=4)]
    mp.spawn(_ddp_worker, args=(2, [free_port(), free_port()], ddp_configs, ds), nprocs=2, join=True)
    ref = _weights(single)
    init = _weights(tmp_path / "single" / "init.pt")
    assert any(not torch.equal(ref[k], init[k]) for k in ref)  # the step really moved the weights
    for other in (accumulated, tmp_path / "ddp" / "final.pt", tmp_path / "ddp_accum" / "final.pt"):
        for k, v in _weights(other).items():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7, msg=f"{other}: {k}")
    for d in ("single", "ddp", "ddp_accum"):
        line = json.loads((tmp_path / d / "metrics.jsonl").read_text())
        assert line["train_samples"] == 16


def _resume_config(out: Path) -> TrainConfig:
    # BatchNorm, dropout, augmentation and Adam: every source of state and randomness a resume must restore.
    return TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [16, 16],
                                                    "batchnorm": True, "dropout": 0.3},
                       data="synthetic", epochs=3, batch_size=8, optimizer="adam", lr=1e-2, augment=True,
                       schedule="cosine", warmup_epochs=1, device="cpu", progress=False, out=str(out), seed=5)


def _resume_data() -> data.Dataset:
    return data.synthetic(n_train=40, n_test=16, image_shape=(3, 8, 8), num_classes=4, seed=6)


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = _resume_data()
    reference = _weights(train(_resume_config(tmp_path / "ref"), dataset=ds))

    def send_sigterm(state: object) -> None:
        if state.step == 7:  # epoch 2, batch 2 of 5
            os.kill(os.getpid(), signal.SIGTERM)

    config = _resume_config(tmp_path / "run")
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        train(config, dataset=ds, on_step=send_sigterm)
    last = ck.load_checkpoint(info.value.checkpoint)
    assert last["position"] == {"epoch": 1, "batch": 2, "elapsed_s": last["position"]["elapsed_s"]}
    assert last["meta"]["step"] == 7 and not (tmp_path / "run" / "final.pt").exists()
    capsys.readouterr()
    resumed = _weights(train(config, dataset=ds, resume=True))
    said = capsys.readouterr().out
    assert f"resuming {tmp_path / 'run' / 'last.pt'} at epoch 2, batch 2 of 5 (optimiser step 7)" in said, said
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k
    ref_lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    run_lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = ("images_per_s", "elapsed_s")
    assert [{k: v for k, v in json.loads(x).items() if k not in strip} for x in run_lines] == \
           [{k: v for k, v in json.loads(x).items() if k not in strip} for x in ref_lines]


KILLER = """
import os, signal, sys
from minima.train import TrainConfig, train
from minima import data
sys.path.insert(0, {root!r})
from tests.test_train import _resume_config, _resume_data
def die(state):
    if state.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
train(_resume_config(__import__('pathlib').Path({out!r})), dataset=_resume_data(), on_epoch=die)
"""


@pytest.mark.slow  # a killed subprocess, then a resume
def test_sigkill_between_epochs_then_resume_is_bit_identical(tmp_path: Path) -> None:
    ds = _resume_data()
    reference = _weights(train(_resume_config(tmp_path / "ref"), dataset=ds))
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT), out=str(out))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert ck.load_checkpoint(out / "last.pt")["position"]["epoch"] == 1
    resumed = _weights(train(_resume_config(out), dataset=ds, resume=True))
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    ds = _toy_data(32)
    # epoch 1 trains normally; at epoch 2 the LR jumps by 1e30 and the loss overflows
    config = _sgd_config(tmp_path / "nan", epochs=3, batch_size=8, schedule="step", milestones=(1,), gamma=1e30)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in epoch 2"):
        train(config, dataset=ds)
    last = ck.load_checkpoint(tmp_path / "nan" / "last.pt")
    assert last["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_stopping_rule_target_loss(tmp_path: Path) -> None:
    ds = _toy_data(32)
    final = train(_sgd_config(tmp_path / "stop", epochs=50, batch_size=8, lr=0.2, target_loss=0.5), dataset=ds)
    lines = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) < 50 and lines[-1]["train_loss"] <= 0.5 < lines[-2]["train_loss"]
    assert "target" in lines[-1]["stopped"]
    assert ck.load_checkpoint(final)["meta"]["epoch"] == len(lines)


def test_stopping_rule_target_accuracy(tmp_path: Path) -> None:
    ds = _toy_data(32)
    final = train(_sgd_config(tmp_path / "acc", epochs=50, batch_size=8, lr=0.2, target_accuracy=0.9), dataset=ds)
    lines = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_accuracy"] >= 0.9 and all(x["train_accuracy"] < 0.9 for x in lines[:-1])
    assert "training accuracy" in lines[-1]["stopped"] and ck.load_checkpoint(final)["meta"]["epoch"] == len(lines)
    with pytest.raises(ValueError, match="fraction in"):
        train(_sgd_config(tmp_path / "bad", target_accuracy=99.0), dataset=ds)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((256, 3, None, 1000), "not divisible by world size 3"),
        ((256, 2, 256, 1000), "larger than the per-rank batch 128"),
        ((256, 2, 48, 1000), "not divisible by micro-batch 48"),
        ((5000, 1, None, 1000), "fewer than one global batch"),
    ],
)
def test_bad_batch_arithmetic(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_batches(*args)
    assert plan_batches(5000, 2, 500, 50_000).accumulation == 5


def test_bad_configs_and_existing_runs(tmp_path: Path) -> None:
    ds = _toy_data(16)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        train(_sgd_config(tmp_path / "a", optimizer="lamb"), dataset=ds)
    with pytest.raises(ValueError, match="needs --milestones"):
        train(_sgd_config(tmp_path / "a", schedule="step"), dataset=ds)
    with pytest.raises(ValueError, match="cannot take this data's images"):
        train(_sgd_config(tmp_path / "a", model_kwargs={"input_shape": [3, 5, 5], "widths": [4]}), dataset=ds)
    train(_sgd_config(tmp_path / "done"), dataset=ds)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_sgd_config(tmp_path / "done"), dataset=ds)
    with pytest.raises(ValueError, match="lr: 0.5 → 0.1"):
        train(_sgd_config(tmp_path / "done", lr=0.1), dataset=ds, resume=True)


def test_a_refused_resume_answers_before_loading_any_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    train(_sgd_config(tmp_path / "done"), dataset=_toy_data(16))

    def no_data(config: object) -> None:
        raise AssertionError("data was loaded before the run directory was checked")

    monkeypatch.setattr("minima.studies.train.load_dataset", no_data)
    with pytest.raises(ValueError, match="lr: 0.5 → 0.1"):
        train(_sgd_config(tmp_path / "done", lr=0.1), resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_sgd_config(tmp_path / "done"))
    # the command: --resume on a directory without last.pt is refused, nothing created
    assert main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "has no last.pt: nothing to resume; drop --resume" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_same_init_seed_gives_same_x0_and_init_from(tmp_path: Path) -> None:
    ds = _toy_data(16)
    train(_sgd_config(tmp_path / "sb", batch_size=4, init_seed=11), dataset=ds)
    train(_sgd_config(tmp_path / "lb", batch_size=16, init_seed=11, seed=99), dataset=ds)
    a, b = _weights(tmp_path / "sb" / "init.pt"), _weights(tmp_path / "lb" / "init.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(_sgd_config(tmp_path / "from", init_from=str(tmp_path / "sb" / "final.pt"), epochs=1), dataset=ds)
    c, d = _weights(tmp_path / "from" / "init.pt"), _weights(tmp_path / "sb" / "final.pt")
    assert all(torch.equal(c[k], d[k]) for k in c)
    with pytest.raises(ck.IncompatibleCheckpointsError, match="shape"):
        train(_sgd_config(tmp_path / "bad", model_kwargs={"input_shape": [3, 4, 4], "widths": [5]},
                          init_from=str(tmp_path / "sb" / "final.pt")), dataset=ds)


@pytest.mark.slow
def test_cli_smoke_c1_one_epoch(tmp_path: Path) -> None:
    out = tmp_path / "c1"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "minima.train", "--model", "c1", "--data", "synthetic", "--train-subset", "128",
         "--test-subset", "64", "--epochs", "1", "--batch-size", "64", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    # one short line of the settings that differ from the defaults (the whole config is in config.json)
    line = next(ln for ln in proc.stdout.splitlines() if "settings other than the defaults" in ln)
    assert 'batch_size=64' in line and 'data="synthetic"' in line and len(line) < 400, line
    assert "1 rank × 1 micro-batch × 64" in proc.stdout and "[minima.train] done in " in proc.stdout
    _, meta = ck.load_model(out / "final.pt")
    assert meta["epoch"] == 1 and meta["step"] == 2 and meta["data"]["source"]["kind"] == "synthetic"
    assert json.loads((out / "config.json").read_text())["model"] == "c1"
    line = json.loads((out / "metrics.jsonl").read_text())
    assert 0.0 <= line["test_accuracy"] <= 1.0 and line["train_samples"] == 128
    # and a second invocation refuses to overwrite it, with exit status 2 and the fix in the message
    again = subprocess.run([sys.executable, "-m", "minima.train", "--model", "c1", "--data", "synthetic",
                            "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_main_resume_needs_only_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    argv = ["--model", "mlp", "--model-kwargs", '{"input_shape": [3, 32, 32], "widths": [4]}', "--data",
            "synthetic", "--train-subset", "64", "--test-subset", "16", "--batch-size", "32", "--epochs", "1",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert main(["--out", str(out), "--resume", "--epochs", "2"]) == 2  # epochs changes the schedule


def test_full_batch_gradient_descent_is_one_batch_of_everything(tmp_path: Path) -> None:
    ds = _toy_data(24)
    common = dict(epochs=3, momentum=0.0, lr=0.3)
    full = train(_sgd_config(tmp_path / "full", batch_size="full", **common), dataset=ds)
    one = train(_sgd_config(tmp_path / "one", batch_size=24, **common), dataset=ds)
    chunks = train(_sgd_config(tmp_path / "chunks", batch_size="full", micro_batch=6, **common), dataset=ds)
    assert all(torch.equal(_weights(full)[k], _weights(one)[k]) for k in _weights(one))
    for k, v in _weights(one).items():  # accumulated over 4 chunks: the same step up to summation order
        torch.testing.assert_close(_weights(chunks)[k], v, rtol=1e-5, atol=1e-6)
    assert ck.load_checkpoint(full)["meta"]["global_batch_size"] == 24
    assert json.loads((tmp_path / "full" / "config.json").read_text())["batch_size"] == 24
    with pytest.raises(ValueError, match="number ≥ 1 or full"):
        train(_sgd_config(tmp_path / "bad", batch_size="half"), dataset=ds)


def test_batch_size_full_on_the_command_line() -> None:
    from minima.train import parse_args

    config, _ = parse_args(["--batch-size", "full", "--out", "x"])
    assert config.batch_size == "full"
    config, _ = parse_args(["--batch-size", "64", "--out", "x"])
    assert config.batch_size == 64
    with pytest.raises(SystemExit):
        parse_args(["--batch-size", "most", "--out", "x"])
