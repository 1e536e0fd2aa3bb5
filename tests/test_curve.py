"""Trained curves: coefficients, exact endpoints, BatchNorm re-estimated along t, bit-exact resume, two ranks,
and the refusals between curve and network checkpoints."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minima import data
from minima.curve import main as curve_main
from minima.curve import run as curve_run
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.curves import coefficients, point_on_curve
from minima.geometry.evaluate import Batching, evaluate, recompute_bn_stats
from minima.interpolate import main as interpolate_main
from minima.optim.steps import TrainingInterrupted
from minima.studies.curve import CurveRequest, train_curve
from minima.studies.loop import TrainState

from .helpers import free_port, rank_worker, toy_checkpoint, toy_dataset


def _req(a: Path, b: Path, out: Path, **kw: object) -> CurveRequest:
    base = dict(checkpoint_a=a, checkpoint_b=b, out=out, epochs=3, batch_size=16, lr=0.05, t="0:1:5", device="cpu",
                progress=False, plot=False)
    base.update(kw)
    return CurveRequest(**base)


@pytest.fixture
def ends(tmp_path: Path) -> tuple[Path, Path, data.Dataset]:
    ds = toy_dataset()
    return (toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6, 5), batchnorm=True),
            toy_checkpoint(tmp_path / "b.pt", 2, ds, widths=(6, 5), batchnorm=True), ds)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_coefficients(t: float) -> None:
    assert coefficients("bezier", 1, t) == pytest.approx([(1 - t) ** 2, 2 * t * (1 - t), t**2], abs=1e-15)
    assert coefficients("bezier", 2, t) == pytest.approx(
        [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], abs=1e-15)
    chain = coefficients("polychain", 2, t)  # bends at t = 1/3 and 2/3
    hand = np.interp(t, [0, 1 / 3, 2 / 3, 1], [1, 0, 0, 0]), np.interp(t, [0, 1 / 3, 2 / 3, 1], [0, 1, 0, 0])
    assert chain[:2] == pytest.approx(list(hand), abs=1e-12) and sum(chain) == pytest.approx(1.0, abs=1e-15)
    assert coefficients("polychain", 0, t) == pytest.approx([1 - t, t], abs=1e-15)
    with pytest.raises(ValueError, match="outside"):
        coefficients("bezier", 1, 1.5)


def test_curve_ends_are_the_checkpoints_exactly(ends: tuple) -> None:
    a, b, _ = ends
    sa, sb = ck.load_checkpoint(a)["state_dict"], ck.load_checkpoint(b)["state_dict"]
    bend = {k: v * 3 + 1 if v.is_floating_point() else v for k, v in sa.items()}
    for kind in ("bezier", "polychain"):
        assert all(torch.equal(point_on_curve([sa, bend, sb], kind, 0.0)[k], sa[k]) for k in sa)
        assert all(torch.equal(point_on_curve([sa, bend, sb], kind, 1.0)[k], sb[k]) for k in sb)
    mid = point_on_curve([sa, bend, sb], "bezier", 0.5)["net.1.weight"].double()
    ref = 0.25 * sa["net.1.weight"].double() + 0.5 * bend["net.1.weight"].double() + 0.25 * sb["net.1.weight"].double()
    assert torch.allclose(mid, ref, rtol=0, atol=1e-6)


def test_train_and_evaluate_with_bn_recomputed_along_t(ends: tuple, tmp_path: Path) -> None:
    a, b, ds = ends
    outs = curve_run(_req(a, b, tmp_path / "c"))
    curve_file = tmp_path / "c" / "curve.pt"
    saved = ck.load_curve_checkpoint(curve_file)
    assert saved["curve"]["endpoints"][0]["sha256"] == ck.sha256_file(a)
    assert saved["curve"]["kind"] == "bezier" and len(saved["bends"]) == 1 and len(saved["meta"]["history"]) == 3
    grid = results.load_grid(outs[0])
    assert list(grid.coords) == ["t"] and grid.attrs["bn_policy"] == "recompute"
    assert "barrier_train_loss" in grid.attrs
    # the point at t = 0.5: BatchNorm re-estimated on the training data, evaluated directly
    model = ck.model_from_checkpoint(ck.load_checkpoint(a))
    sa, sb = ck.load_checkpoint(a)["state_dict"], ck.load_checkpoint(b)["state_dict"]
    model.load_state_dict(point_on_curve([sa, *saved["bends"], sb], "bezier", 0.5))
    recompute_bn_stats(model, ds.train, ds.mean, ds.std, Batching(1000))
    ref = evaluate(model, ds.test, ds.mean, ds.std, Batching(1000))
    i = int(np.flatnonzero(grid.coords["t"] == 0.5)[0])
    assert grid.values["test/loss"][i] == pytest.approx(ref.loss, rel=1e-6)
    assert grid.values["test/accuracy"][i] == pytest.approx(ref.accuracy, abs=1e-12)
    line = results.load_grid(outs[1])  # the straight line between the same endpoints shares t = 0 and t = 1
    for k in ("train/loss", "test/loss"):
        assert line.values[k][[0, -1]] == pytest.approx(grid.values[k][[0, -1]], rel=1e-6)


def test_sigterm_mid_training_then_resume_is_bit_identical(ends: tuple, tmp_path: Path) -> None:
    a, b, _ = ends
    whole = train_curve(_req(a, b, tmp_path / "whole"))

    def kill_at_step_8(state: TrainState) -> None:
        if state.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train_curve(_req(a, b, tmp_path / "cut"), on_step=kill_at_step_8)
    assert (tmp_path / "cut" / "last.pt").is_file() and not (tmp_path / "cut" / "curve.pt").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_curve(_req(a, b, tmp_path / "cut"))
    with pytest.raises(ValueError, match="lr: 0.05 → 0.1"):
        train_curve(_req(a, b, tmp_path / "cut", lr=0.1, resume=True))
    resumed = train_curve(_req(a, b, tmp_path / "cut", resume=True))
    one, two = ck.load_curve_checkpoint(whole), ck.load_curve_checkpoint(resumed)
    assert all(torch.equal(one["bends"][0][k], two["bends"][0][k]) for k in one["bends"][0])
    assert one["meta"]["history"] == two["meta"]["history"]


@pytest.mark.slow
def test_two_rank_training_equals_one_rank(tmp_path: Path) -> None:
    ds = toy_dataset()  # without BatchNorm: batch statistics of a rank's half-batch would differ from the whole's
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6, 5))
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, widths=(6, 5))
    one = train_curve(_req(a, b, tmp_path / "one"))
    mp.spawn(rank_worker, args=(free_port(), train_curve, _req(a, b, tmp_path / "two")), nprocs=2, join=True)
    b1 = ck.load_curve_checkpoint(one)["bends"][0]
    b2 = ck.load_curve_checkpoint(tmp_path / "two" / "curve.pt")["bends"][0]
    for k in b1:
        torch.testing.assert_close(b2[k], b1[k], rtol=1e-5, atol=1e-6)


def test_curve_and_network_checkpoints_are_not_confused(ends: tuple, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    a, b, ds = ends
    train_curve(_req(a, b, tmp_path / "c", epochs=1))
    curve_file = tmp_path / "c" / "curve.pt"
    assert interpolate_main([str(curve_file), str(b), "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert "is a curve checkpoint" in err and "--evaluate" in err and err.count("\n") == 1
    assert curve_main(["--evaluate", str(a)]) == 2
    err = capsys.readouterr().err
    assert "is a network checkpoint" in err and err.count("\n") == 1
    other = toy_checkpoint(tmp_path / "other.pt", 3, ds, widths=(7,), batchnorm=True)
    assert curve_main([str(a), str(other), "--out", str(tmp_path / "d")]) == 2
    assert "do not share one architecture" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.h5").exists()


def test_micro_batches_give_the_same_curve_and_augmentation_is_recorded(tmp_path: Path) -> None:
    """The curve on the one training loop: gradients accumulated over micro-batches of 4 equal the whole batch's
    (to float32 rounding: the sums are split; without BatchNorm, whose statistics are per micro-batch as in the
    trainer); ``--augment`` trains another curve and is part of what a resume must share."""
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "plain_a.pt", 1, ds, widths=(6, 5))
    b = toy_checkpoint(tmp_path / "plain_b.pt", 2, ds, widths=(6, 5))
    whole = ck.load_curve_checkpoint(train_curve(_req(a, b, tmp_path / "whole", epochs=2)))
    micro = ck.load_curve_checkpoint(train_curve(_req(a, b, tmp_path / "micro", epochs=2, micro_batch=4)))
    for k, v in whole["bends"][0].items():
        torch.testing.assert_close(micro["bends"][0][k], v, rtol=1e-5, atol=1e-6, msg=k)
    aug = ck.load_curve_checkpoint(train_curve(_req(a, b, tmp_path / "aug", epochs=2, augment=True)))
    assert aug["meta"]["training"]["augment"] is True
    assert any(not torch.equal(aug["bends"][0][k], v) for k, v in whole["bends"][0].items())
    with pytest.raises(ValueError, match="augment: True → False"):
        train_curve(_req(a, b, tmp_path / "aug", epochs=2, resume=True))
    with pytest.raises(ValueError, match="not divisible by micro-batch 5"):
        train_curve(_req(a, b, tmp_path / "bad", micro_batch=5))


def test_usr2_under_submitit_stops_a_curve_with_a_bit_exact_resume(ends: tuple, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, _ = ends
    whole = ck.load_curve_checkpoint(train_curve(_req(a, b, tmp_path / "whole")))
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # inside a submitit job: USR2 announces pre-emption

    def preempt(state: TrainState) -> None:
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGUSR2)

    with pytest.raises(TrainingInterrupted, match="signal 12"):
        train_curve(_req(a, b, tmp_path / "cut"), on_step=preempt)
    resumed = ck.load_curve_checkpoint(train_curve(_req(a, b, tmp_path / "cut", resume=True)))
    assert all(torch.equal(whole["bends"][0][k], resumed["bends"][0][k]) for k in whole["bends"][0])
    assert whole["meta"]["history"] == resumed["meta"]["history"]
