from __future__ import annotations

import math

import pytest

from minima.optim.schedule import LRSchedule, build_schedule, learning_rate, scaled_lr


def test_scaling_rules() -> None:
    assert scaled_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2)
    assert scaled_lr(0.1, 256, 1024, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(1e-3, 256, 5000, "none") == 1e-3
    with pytest.raises(ValueError, match="unknown LR scaling rule 'cubic'"):
        scaled_lr(0.1, 256, 512, "cubic")


def test_goyal_warmup_then_step() -> None:
    # 8k batch, η_ref 0.1 → 3.2; 5 warmup epochs of 10 steps; /10 at epochs 30, 60, 80 (Goyal §5.1).
    s = build_schedule(ref_lr=0.1, ref_batch=256, global_batch=8192, scaling="linear", warmup_epochs=5,
                       kind="step", milestones_epochs=(30, 60, 80), gamma=0.1, epochs=90, steps_per_epoch=10)
    assert s.warmup_steps == 50 and s.milestones == (300, 600, 800)
    assert learning_rate(0, s) == pytest.approx(0.1)
    assert learning_rate(25, s) == pytest.approx(0.1 + (3.2 - 0.1) * 25 / 50)  # 1.65, every iteration
    assert learning_rate(50, s) == pytest.approx(3.2)
    assert learning_rate(299, s) == pytest.approx(3.2)
    assert learning_rate(300, s) == pytest.approx(0.32)
    assert learning_rate(650, s) == pytest.approx(0.032)
    assert learning_rate(899, s) == pytest.approx(0.0032)


def test_cosine_after_warmup() -> None:
    s = LRSchedule(peak_lr=0.4, start_lr=0.1, warmup_steps=10, total_steps=110, kind="cosine")
    assert learning_rate(5, s) == pytest.approx(0.25)
    assert learning_rate(10, s) == pytest.approx(0.4)
    assert learning_rate(60, s) == pytest.approx(0.2)  # half way: (1 + cos(π/2)) / 2 = 0.5
    assert learning_rate(35, s) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(110, s) == pytest.approx(0.0, abs=1e-15)


def test_constant_and_validation() -> None:
    s = LRSchedule(peak_lr=1e-3, start_lr=1e-3, warmup_steps=0, total_steps=5)
    assert [learning_rate(t, s) for t in range(5)] == [1e-3] * 5
    with pytest.raises(ValueError, match="unknown LR schedule 'poly'"):
        LRSchedule(peak_lr=1, start_lr=1, warmup_steps=0, total_steps=1, kind="poly")


def test_warmup_below_reference_batch_does_not_decay() -> None:
    s = build_schedule(ref_lr=0.1, ref_batch=256, global_batch=64, scaling="linear", warmup_epochs=2,
                       kind="constant", milestones_epochs=(), gamma=0.1, epochs=5, steps_per_epoch=10)
    assert [learning_rate(t, s) for t in (0, 10, 19, 20)] == pytest.approx([0.025] * 4)
