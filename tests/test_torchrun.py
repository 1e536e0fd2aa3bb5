"""The documented commands under a real ``torchrun`` launch (2 CPU processes, gloo) equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minima.files import checkpoint as ck
from minima.files import results

from .helpers import free_port

pytestmark = pytest.mark.slow  # several processes each: end-to-end checks of torchrun

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--model", "mlp", "--model-kwargs", '{"input_shape": [3, 32, 32], "widths": [8]}', "--data", "synthetic",
         "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--epochs", "2", "--optimizer", "sgd",
         "--lr", "0.05", "--device", "cpu", "--no-progress"]


def _run(args: list[str], world: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
                 str(free_port())] if world > 1 else [sys.executable])
    proc = subprocess.run([*launcher, "-m", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("torchrun")
    out = {}
    for world in (1, 2):
        out[world] = base / f"w{world}"
        _run(["minima.train", *TRAIN, "--out", str(out[world])], world)
    return out


def test_torchrun_training_equals_one_process(runs: dict[int, Path]) -> None:
    one, two = (ck.load_checkpoint(runs[w] / "final.pt") for w in (1, 2))
    assert two["meta"]["world_size"] == 2 and one["meta"]["step"] == two["meta"]["step"] == 4
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-5, atol=1e-6)


def test_torchrun_interpolation_and_sharpness_equal_one_process(runs: dict[int, Path], tmp_path: Path) -> None:
    a, b = runs[1] / "init.pt", runs[1] / "final.pt"
    curves, sharp = {}, {}
    for world in (1, 2):
        out = tmp_path / f"curve{world}.h5"
        _run(["minima.interpolate", str(a), str(b), "--alphas", "-1:2:5", "--out", str(out), "--device", "cpu",
              "--no-plot", "--no-progress"], world)
        curves[world] = results.load_curve(out)
        s_out = tmp_path / f"sharp{world}.h5"
        _run(["minima.sharpness", str(b), "--metrics", "keskar,hessian", "--eps", "1e-3", "--subspace", "0",
              "--topk", "1", "--dtype", "float64", "--batch-size", "16", "--device", "cpu", "--out", str(s_out)], world)
        sharp[world] = {r["metric"]: float(r["value"]) for r in results.load_sharpness(s_out)}
    np.testing.assert_allclose(curves[2].train_loss, curves[1].train_loss, rtol=1e-6)
    np.testing.assert_array_equal(curves[2].test_accuracy, curves[1].test_accuracy)
    assert sharp[2].keys() == sharp[1].keys()
    for metric, value in sharp[1].items():
        assert sharp[2][metric] == pytest.approx(value, rel=1e-8), metric
