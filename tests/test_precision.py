"""The float32 math policy: flags set for a block and restored, and recorded in every output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minima import data
from minima.core.precision import effective, float32_math
from minima.files import checkpoint as ck
from minima.files import results
from minima.studies.interpolate import SweepRequest, run
from minima.studies.train import TrainConfig, train

from .helpers import toy_checkpoint, toy_dataset


def _flags() -> tuple[bool, bool, str]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def test_flags_are_set_inside_and_restored_after_even_on_error() -> None:
    before = _flags()
    with float32_math("tf32"):
        assert _flags() == (True, True, "high")
    with float32_math("fp32"):
        assert _flags() == (False, False, "highest")
        assert effective("cpu", "fp32")["tf32_applies"] is False  # no TF32 on a CPU, whatever the flags
    with pytest.raises(RuntimeError, match="boom"), float32_math("tf32"):
        raise RuntimeError("boom")
    with float32_math("default"):
        assert _flags() == before
    assert _flags() == before
    with pytest.raises(ValueError, match="unknown float32 math 'tf16'"), float32_math("tf16"):  # type: ignore[arg-type]
        pass


def test_curves_and_checkpoints_record_the_float32_math(tmp_path: Path) -> None:
    before = _flags()
    ds = toy_dataset()
    a, b = toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds)
    curve = results.load_curve(run(SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas="0,1", out=tmp_path / "c.h5",
                                                device="cpu", plot=False, progress=False, float32_math="tf32")))
    recorded = json.loads(curve.attrs["precision"])
    assert recorded["float32_math"] == "tf32" and recorded["cudnn_allow_tf32"] is True
    assert recorded["tf32_applies"] is False and curve.config["float32_math"] == "tf32"
    assert _flags() == before  # the library left the process as it found it
    config = TrainConfig(model="mlp", model_kwargs={"widths": [4]}, data="synthetic", epochs=1, batch_size=64,
                         out=str(tmp_path / "run"), progress=False, float32_math="fp32")
    final = train(config, dataset=data.load_source("synthetic").subset(128, 32, 0))
    meta = ck.load_checkpoint(final)["meta"]
    assert meta["precision"]["float32_math"] == "fp32" and meta["precision"]["cuda_matmul_allow_tf32"] is False
    assert meta["precision"]["autocast"] is None and _flags() == before


def test_data_placement_policy() -> None:
    cuda = torch.device("cuda", 0)
    assert data.decide_placement("auto", cuda, nbytes=10, free_bytes=100).resident
    far = data.decide_placement("auto", cuda, nbytes=60, free_bytes=100)  # more than half of the free memory
    assert not far.resident and far.pinned
    assert data.decide_placement("no", cuda, 1, 100).describe() == {"policy": "no", "resident": False, "pinned": True,
                                                                   "device": "cuda:0"}
    assert data.decide_placement("yes", cuda, 90, 100).resident
    with pytest.raises(data.DataError, match=r"needs 0.00 GB but cuda:0 has 0.00 GB free; use --data-on-device"):
        data.decide_placement("yes", cuda, 101, 100)
    cpu = data.decide_placement("no", torch.device("cpu"), 10**12, None)
    assert cpu.resident and not cpu.pinned  # a CPU's host memory is its own
    with pytest.raises(data.DataError, match="unknown data placement 'maybe'"):
        data.decide_placement("maybe", cuda, 1, 1)  # type: ignore[arg-type]
    ds = data.synthetic(8, 4, (1, 2, 2), 2)
    (train,), where = data.place([ds.train], "yes", torch.device("cpu"))
    assert train is ds.train and where.resident


def test_device_batches_follow_the_chunks_in_order() -> None:
    ds = data.synthetic(30, 4, (1, 2, 2), 3, seed=2)
    chunks = list(torch.arange(30).flip(0).split(7))
    got = list(data.DeviceBatches(ds.train, chunks, torch.device("cpu"), pinned=False))
    assert [len(y) for _, y in got] == [7, 7, 7, 7, 2]
    for (x, y), chunk in zip(got, chunks, strict=True):
        assert torch.equal(x, ds.train.images[chunk]) and torch.equal(y, ds.train.labels[chunk])
