"""Adaptive worst-case sharpness (Auto-PGD): exact maxima where they are known, exact projections, invariance to
ReLU rescaling, m-sharpness, and the refusals."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from minima import data
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.registry import get_metric, worst_batches
from minima.curvature.worstcase import apgd, project_l2_euclidean, project_l2_scaled, worst_case_sharpness
from minima.files import results
from minima.geometry.evaluate import Batching
from minima.models import build_model
from minima.sharpness import main as sharpness_main

from .helpers import toy_checkpoint, toy_dataset


def _rescaled_pair(seed: int, scales: dict[str, float]) -> tuple[DatasetObjective, DatasetObjective]:
    """Objectives of a tiny float64 MLP and of a copy whose tensors are multiplied by ``scales`` (state-dict key →
    factor), on the same 64 images."""
    torch.manual_seed(seed)
    ds = data.synthetic(n_train=64, n_test=8, image_shape=(3, 4, 4), num_classes=3, seed=5)
    model = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[8]).double()
    scaled = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[8]).double()
    scaled.load_state_dict({k: v * scales.get(k, 1.0) for k, v in model.state_dict().items()})
    return _objective(model, ds), _objective(scaled, ds)


def test_logit_normalisation_ignores_the_scale_of_the_last_layer() -> None:
    one, two = _rescaled_pair(2, {"net.3.weight": 3.0, "net.3.bias": 3.0})
    normed = (_worst(one, logit_norm=True), _worst(two, logit_norm=True))
    assert normed[0] == pytest.approx(normed[1], rel=1e-8) and normed[0] > 0
    assert abs(_worst(one) - _worst(two)) > 1e-3 * abs(_worst(one))  # without it, the scale changes the measure


def _job(**kw: object) -> dict:
    job = {"rho": 0.05, "norm": "linf", "adaptive": True, "m": 32, "n": 64, "iterations": 20, "l2_step": "invariant"}
    job.update(kw)
    return job


def test_convex_separable_quadratic_reaches_the_best_vertex() -> None:
    rng = np.random.default_rng(0)
    d = 7
    a, b = torch.from_numpy(rng.uniform(0, 3, d)), torch.from_numpy(rng.normal(0, 1, d))
    w = torch.from_numpy(rng.normal(0, 1, d))

    def vg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return float(0.5 * (a * x * x).sum() + (b * x).sum()), a * x + b

    rho = 0.3
    best = max(vg(w + rho * w.abs() * torch.tensor(signs, dtype=torch.float64))[0]
               for signs in itertools.product((-1.0, 1.0), repeat=d))
    r = apgd(vg, w, rho, norm="linf")
    assert r.f_best == pytest.approx(best, rel=1e-12) and r.evaluations == 21
    # a linear loss over the ellipsoid: the maximum is ρ‖c ⊙ |w|‖ at δ = ρ|w| ⊙ u/‖u‖, u = c ⊙ |w|
    r = apgd(lambda x: (float(b @ x), b.clone()), w, rho, norm="l2")
    assert r.f_best - r.f0 == pytest.approx(rho * float((b * w.abs()).norm()), rel=1e-12)
    authors = apgd(lambda x: (float(b @ x), b.clone()), w, rho, norm="l2", l2_step="authors")
    assert authors.f_best - authors.f0 <= r.f_best - r.f0 + 1e-12


def test_ellipsoid_projections_are_exact() -> None:
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.uniform(0.1, 3.0, 50))
    delta = torch.from_numpy(rng.normal(0, 2, 50))
    rho = 0.7
    p = project_l2_euclidean(delta, s, rho)
    assert float(((p / s) ** 2).sum()) == pytest.approx(rho**2, rel=1e-9)  # on the boundary
    # KKT: δ − p = λ·p/s² with one λ ≥ 0 for every coordinate
    lam = (delta - p) * s * s / p
    assert float(lam.min()) >= 0 and float(lam.max() - lam.min()) <= 1e-6 * float(lam.mean())
    inside = 0.1 * delta / float((delta / s).norm())
    assert torch.equal(project_l2_euclidean(inside, s, rho), inside)
    q = project_l2_scaled(delta, s, rho)  # the ball in z = δ/s: a rescaling of z
    assert float((q / s).norm()) == pytest.approx(rho, rel=1e-12)
    torch.testing.assert_close(q / s, (delta / s) * rho / float((delta / s).norm()), rtol=1e-12, atol=0)


def _objective(model: torch.nn.Module, ds: data.Dataset) -> DatasetObjective:
    feed = Batching(1000, dtype=torch.float64)
    return DatasetObjective(model.double(), FixedBatches.from_split(ds.train, ds.mean, ds.std, feed))


def _worst(obj: DatasetObjective, **kw: object) -> float:
    x = obj.get_flat()
    return get_metric("worst_case").compute(obj, x, obj.value(x), _job(**kw), 0)["value"]


def test_relu_rescaling_leaves_the_invariant_measures_unchanged() -> None:
    one, two = _rescaled_pair(0, {"net.1.weight": 4.0, "net.1.bias": 4.0, "net.3.weight": 0.25})
    assert one.value() == pytest.approx(two.value(), rel=1e-12)  # the same function
    for kw in ({"norm": "linf"}, {"norm": "l2", "rho": 0.5}):
        assert _worst(one, **kw) == pytest.approx(_worst(two, **kw), rel=1e-8, abs=1e-12), kw
        assert _worst(one, **kw) > 0
    authors = {"norm": "l2", "rho": 0.5, "l2_step": "authors"}
    assert abs(_worst(one, **authors) - _worst(two, **authors)) > 1e-6 * abs(_worst(one, **authors))


def test_worst_case_beats_random_points_and_one_batch_is_plain_sharpness() -> None:
    torch.manual_seed(1)
    ds = data.synthetic(n_train=64, n_test=8, image_shape=(3, 4, 4), num_classes=3, seed=6)
    model = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[8], batchnorm=True).double()
    obj = _objective(model, ds)
    obj_eval = DatasetObjective(model.double(), obj.data, bn="eval")
    x = obj.get_flat()
    f0 = obj_eval.value(x)
    r = apgd(obj_eval.value_and_grad, x, 0.05)
    gen = torch.Generator().manual_seed(0)
    randoms = [obj_eval.value(x + 0.05 * x.abs() * (2 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 1))
               for _ in range(200)]
    assert r.f_best >= max(randoms) >= f0
    # m = n = every image: one batch, the plain adaptive sharpness of the whole objective
    whole = _worst(obj, m=64, n=64)
    assert whole == pytest.approx(r.f_best - r.f0, rel=1e-10)
    # two batches of 32: their mean, each maximised on its own
    halves = worst_case_sharpness([_half(model, obj, i) for i in (0, 1)], x, 0.05, m=32, n=64)
    assert _worst(obj, m=32, n=64) == pytest.approx(halves.sharpness, rel=1e-10)


def _half(model: torch.nn.Module, obj: DatasetObjective, i: int) -> Callable[[torch.Tensor], tuple]:
    (x, y), = obj.data.batches
    part = FixedBatches([(x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)])], 32, obj.device, obj.dtype, local=True)
    return DatasetObjective(model, part, bn="eval").value_and_grad


def test_worst_case_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    base = [str(a), "--metrics", "worst_case", "--out", str(tmp_path / "w.h5")]
    for extra, message in ((["--worst-rho", "0"], "--worst-rho must be > 0"),
                           (["--worst-m", "128", "--worst-n", "64"], "exceeds --worst-n"),
                           (["--worst-m", "30", "--worst-n", "64"], "not a multiple"),
                           (["--worst-m", "32", "--worst-n", "128"], "exceeds the 96 training images")):
        assert sharpness_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w.h5").exists()
    assert sharpness_main([*base, "--worst-m", "32", "--worst-n", "64", "--worst-iterations", "5"]) == 0


def test_worst_case_defaults_shrink_to_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A default --worst-n (1,024) on fewer images uses all of them and says so in one line; --worst-m's default
    shrinks to n when n < 128; given values are kept (and refused when they do not fit, as above)."""
    assert worst_batches(None, None, None) == (1024, 128)
    assert worst_batches(None, None, 50_000) == (1024, 128)
    assert worst_batches(None, None, 300) == (256, 128)  # a multiple of m
    assert worst_batches(None, None, 96) == (96, 96)
    assert worst_batches(None, 32, 100) == (96, 32)
    assert worst_batches(64, None, 96) == (64, 64)
    assert worst_batches(2048, 128, 96) == (2048, 128)  # given: kept, then refused by batch_objectives
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    out = tmp_path / "w.h5"
    assert sharpness_main([str(a), "--metrics", "worst_case", "--worst-iterations", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("--worst-n: the default 1,024 exceeds") == 1 and "uses 96 of them (batches of 96)" in said
    (row,) = results.load_sharpness(out)
    assert row["metric"] == "worst_adaptive_linf_rho0.002_m96_n96" and row["n"] == 96 and row["m"] == 96
    assert sharpness_main([str(a), "--metrics", "worst_case", "--train-subset", "64", "--worst-m", "32",
                           "--worst-iterations", "2", "--out", str(tmp_path / "w64.h5")]) == 0
    assert "uses 64 of them (batches of 32)" in capsys.readouterr().out


def test_the_authors_loop_on_a_linear_loss_follows_their_momentum() -> None:
    """Issue 29 item 6: on f(w + δ) = f0 + gᵀδ over the ℓ∞ box the authors' iteration x_{k+1} = 0.75·z_{k+1} +
    0.25·x_{k−1} (z_{k+1} = P(x_k + η·s ⊙ sign g), always the box's corner here) gives x_k = c_k·ρ s ⊙ sign g with
    c₁ = c₂ = 0.75, c_k = 0.75 + 0.25·c_{k−2}: it approaches the corner without reaching it, while the Auto-PGD
    paper's iteration (a second projection) sits on it. Their checks after the 0-based iterations 5, 9, 12, 15, 16,
    18, 19 (N = 20), one later than Auto-PGD's."""
    from minima.curvature.worstcase import authors_checkpoints, checkpoints

    assert [k for k in authors_checkpoints(20) if k < 20] == [5, 9, 12, 15, 16, 18, 19]
    assert [k - 1 for k in checkpoints(20) if k > 0] == [4, 8, 11, 14, 15, 17, 18]
    torch.manual_seed(0)
    w, g = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)

    def linear(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return 1.0 + float(g @ (x - w)), g.clone()

    rho, full = 0.01, 0.01 * float((w.abs() * g.abs()).sum())
    c = [0.0, 0.75]
    for _ in range(19):
        c.append(0.75 + 0.25 * c[-2])
    theirs = apgd(linear, w, rho, iterations=20, loop="authors")
    assert theirs.f_best - theirs.f0 == pytest.approx(max(c) * full, rel=1e-12) and max(c) < 1
    ours = apgd(linear, w, rho, iterations=20, loop="apgd")
    assert ours.f_best - ours.f0 == pytest.approx(full, rel=1e-12)
    with pytest.raises(ValueError, match="unknown worst-case loop"):
        apgd(linear, w, rho, loop="mine")


def test_worst_case_results_record_their_loop(tmp_path: Path) -> None:
    """The authors' loop is the default and keeps the plain result name; the Auto-PGD paper's is ``…_apgd``; every
    result records its loop."""
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    out = tmp_path / "w.h5"
    base = [str(a), "--metrics", "worst_case", "--worst-m", "32", "--worst-n", "64", "--worst-iterations", "4",
            "--out", str(out)]
    assert sharpness_main(base) == 0 and sharpness_main([*base, "--worst-loop", "apgd"]) == 0
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    assert {name: r["loop"] for name, r in rows.items()} == {
        "worst_adaptive_linf_rho0.002_m32_n64": "authors", "worst_adaptive_linf_rho0.002_m32_n64_apgd": "apgd"}
