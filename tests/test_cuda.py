"""CUDA checks (``pytest -m cuda``; skipped without a GPU): the GPU computes what the CPU computes, with the float32
math policy at ``fp32`` (TF32 off), and device-resident data gives the host's batches bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minima import data
from minima.core.precision import float32_math
from minima.files import results
from minima.studies.interpolate import SweepRequest, run
from minima.studies.sharpness import MeasureRequest, measure
from minima.studies.train import TrainConfig, train

from .helpers import free_port, toy_checkpoint, toy_dataset

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, device: str, name: str, **kw: object) -> dict[str, torch.Tensor]:
    config = TrainConfig(model="c1", data="synthetic", epochs=1, batch_size=64, device=device, progress=False,
                         out=str(tmp_path / name), float32_math="fp32", eval_test=False, **kw)
    ds = data.synthetic(256, 64, (3, 32, 32), 10, seed=3)
    final = train(config, dataset=ds)
    return {k: v.double() for k, v in torch.load(final, weights_only=True)["state_dict"].items()}


def test_training_steps_equal_the_cpu_steps_in_fp32(tmp_path: Path) -> None:
    cpu, gpu = _train(tmp_path, "cpu", "cpu"), _train(tmp_path, "cuda", "gpu")
    for key, value in cpu.items():
        if value.is_floating_point():
            torch.testing.assert_close(gpu[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_device_resident_and_pinned_batches_equal_host_batches_bit_for_bit(tmp_path: Path) -> None:
    ds = data.synthetic(128, 32, (3, 32, 32), 10, seed=4)
    (on_gpu,), where = data.place([ds.train], "yes", torch.device("cuda"))
    (pinned,), host = data.place([ds.train], "no", torch.device("cuda"))
    assert where.resident and on_gpu.images.is_cuda and host.pinned and pinned.images.is_pinned()
    idx = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:50]
    ref = data.augment(ds.train.images[idx], torch.Generator().manual_seed(9))
    dev = data.augment(on_gpu.images[idx.cuda()], torch.Generator().manual_seed(9))
    assert torch.equal(dev.cpu(), ref)
    assert torch.equal(data.normalize(on_gpu.images[idx.cuda()], ds.mean, ds.std).cpu(),
                       data.normalize(ds.train.images[idx], ds.mean, ds.std))
    cpu_run, gpu_run = (_train(tmp_path, d, f"aug_{d}", augment=True, data_on_device="yes") for d in ("cpu", "cuda"))
    for key, value in cpu_run.items():
        if value.is_floating_point():
            torch.testing.assert_close(gpu_run[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_curves_and_sharpness_equal_the_cpu_values(tmp_path: Path) -> None:
    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True), toy_checkpoint(tmp_path / "b.pt", 2, ds,
                                                                                       batchnorm=True)
    curves = {}
    for device in ("cpu", "cuda"):
        curves[device] = results.load_curve(run(SweepRequest(
            checkpoint_a=a, checkpoint_b=b, alphas="-1:2:4", out=tmp_path / f"{device}.h5", device=device,
            plot=False, progress=False)))
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose(getattr(curves["cuda"], key), getattr(curves["cpu"], key), rtol=1e-5)
    assert '"cuda_matmul_allow_tf32": false' in curves["cuda"].attrs["precision"]
    values = {}
    for device in ("cpu", "cuda"):
        out = measure(MeasureRequest(checkpoints=[a], metrics=("keskar", "hessian"), eps=(1e-3,), subspace=None,
                                     maxiter=3, topk=1, eig_tol=1e-8, out=tmp_path / f"s_{device}.h5", device=device))
        values[device] = {r["metric"]: float(r["value"]) for r in results.load_sharpness(out)}
    for metric, value in values["cpu"].items():
        assert values["cuda"][metric] == pytest.approx(value, rel=1e-4), metric


def test_the_float32_math_policy_changes_what_cudnn_computes() -> None:
    """TF32 is what a cuDNN convolution computes by default on Ampere and newer: fp32 turns it off."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 exists from compute capability 8.0")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 64, 32, 32, device="cuda", generator=gen)
    w = torch.randn(64, 64, 5, 5, device="cuda", generator=gen)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=2)
    with float32_math("fp32"):
        exact = torch.nn.functional.conv2d(x, w, padding=2)
    with float32_math("tf32"):
        fast = torch.nn.functional.conv2d(x, w, padding=2)
    err = lambda y: float((y.double() - ref).abs().max() / ref.abs().max())  # noqa: E731
    assert err(exact) < 1e-5 < err(fast)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_with_nccl_equals_one_process(tmp_path: Path) -> None:
    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds)
    one = results.load_curve(run(SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas="-1:2:4",
                                              out=tmp_path / "one.h5", device="cuda", plot=False, progress=False)))
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "minima.interpolate", str(a), str(b), "--alphas=-1:2:4", "--out", str(tmp_path / "two.h5"),
                           "--device", "cuda", "--no-plot", "--no-progress"], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    two = results.load_curve(tmp_path / "two.h5")
    np.testing.assert_allclose(two.test_loss, one.test_loss, rtol=1e-5)


def test_hvps_lanczos_and_hutchinson_keep_parameter_vectors_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from minima.curvature.hessian import hessian_operator, hutchinson_trace, top_eigenvalues
    from minima.curvature.objective import DatasetObjective, FixedBatches
    from minima.geometry.evaluate import Batching
    from minima.models import build_model

    ds = data.synthetic(200, 8, (3, 32, 32), 10, seed=5)
    batches = FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(100, "cuda"))
    obj = DatasetObjective(build_model("c1"), batches, hvp_cache_bytes=2**33)
    n, copies = obj.numel, []
    original_to, original_cpu = torch.Tensor.to, torch.Tensor.cpu

    def counting_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = original_to(self, *args, **kwargs)
        if self.is_cuda and not out.is_cuda and self.numel() >= n:
            copies.append(self.numel())
        return out

    def counting_cpu(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.is_cuda and self.numel() >= n:
            copies.append(self.numel())
        return original_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    assert obj.get_flat().is_cuda and obj.hvp(torch.ones(n, dtype=torch.float64)).is_cuda
    res = top_eigenvalues(hessian_operator(obj), k=2, tol=1e-2)
    trace = hutchinson_trace(hessian_operator(obj), min_probes=2, max_probes=3)
    assert res.hvps > 0 and trace.probes >= 2
    assert copies == [], f"parameter-sized device→host copies: {copies}"


def test_pinned_batches_are_prefetched_and_equal_host_batches() -> None:
    ds = data.synthetic(64, 8, (3, 8, 8), 4, seed=7)
    chunks = list(torch.randperm(64, generator=torch.Generator().manual_seed(1)).split(10))
    got = list(data.DeviceBatches(ds.train.pin_memory(), chunks, torch.device("cuda"), pinned=True))
    assert len(got) == len(chunks)
    for (x, y), chunk in zip(got, chunks, strict=True):
        assert x.is_cuda and torch.equal(x.cpu(), ds.train.images[chunk])
        assert torch.equal(y.cpu(), ds.train.labels[chunk])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_probes_under_torchrun_with_sync_bn_equal_one_process(tmp_path: Path) -> None:
    """A BatchNorm network trained with --sync-bn on two GPUs: its λ_max probes (BatchNorm batch mode) run without a
    collective inside the probe and equal those of one process (SyncBatchNorm over two half batches is BatchNorm
    over the whole batch, up to rounding)."""
    import json

    from minima.files import timeline

    args = ["--model", "mlp", "--model-kwargs", json.dumps({"widths": [32], "batchnorm": True}), "--data",
            "synthetic", "--train-subset", "256", "--test-subset", "64", "--epochs", "2", "--batch-size", "64",
            "--optimizer", "sgd", "--lr", "0.05", "--probe", "hessian:2", "--probe-subset", "128",
            "--probe-bn-mode", "batch", "--eval-batch-size", "32", "--device", "cuda", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "minima.train", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minima.train",
                          *args, "--sync-bn", "--out", str(tmp_path / "two")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (timeline.load(tmp_path / name / "probes.h5")["hessian"] for name in ("one", "two"))
    np.testing.assert_array_equal(a["step"], b["step"])
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-3)
