"""REPAIR: the endpoints are unchanged, the repaired units carry the interpolated statistics, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minima import data
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.directions import lerp_state
from minima.geometry.evaluate import Batching
from minima.geometry.permute import permutation_spec
from minima.geometry.repair import EPS, repair_state, repaired_layers, repaired_model, target, unit_statistics
from minima.interpolate import SweepRequest, main, run
from minima.models import build_model

from .helpers import toy_checkpoint, toy_dataset


def _req(a: Path, b: Path, out: Path, **kw: object) -> SweepRequest:
    base = dict(checkpoint_a=a, checkpoint_b=b, alphas="0:1:5", out=out, device="cpu", plot=False, progress=False,
                repair=True)
    base.update(kw)
    return SweepRequest(**base)


def test_repair_leaves_the_endpoints_unchanged_and_records_itself(tmp_path: Path) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6, 5))
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, widths=(6, 5))
    # one batch holds the training images the statistics are measured on: REPAIR is exactly the identity at α = 0, 1
    plain = results.load_curve(run(_req(a, b, tmp_path / "plain.h5", repair=False)))
    fixed = results.load_curve(run(_req(a, b, tmp_path / "repair.h5")))
    for i in (0, -1):
        for field in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert getattr(fixed, field)[i] == pytest.approx(getattr(plain, field)[i], rel=1e-5, abs=1e-7), field
    assert any(abs(fixed.train_loss[i] - plain.train_loss[i]) > 1e-4 for i in (1, 2, 3))  # the middle moves
    assert '"repair": true' in fixed.attrs["config"]


@pytest.mark.parametrize("batch", [256, 50])
def test_repaired_units_carry_the_interpolated_statistics(batch: int) -> None:
    torch.manual_seed(0)
    ds = data.synthetic(n_train=256, n_test=8, image_shape=(3, 4, 4), num_classes=3, seed=3)
    model_a = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[7, 6])
    model_b = build_model("mlp", 3, input_shape=[3, 4, 4], widths=[7, 6])
    spec = permutation_spec(model_a, data.normalize(ds.train.images[:2], ds.mean, ds.std))
    layers = repaired_layers(spec)
    assert layers == ["net.1", "net.3"]
    feed = Batching(batch)
    stats_a = unit_statistics(model_a, layers, ds.train, ds.mean, ds.std, feed)
    stats_b = unit_statistics(model_b, layers, ds.train, ds.mean, ds.std, feed)
    work = repaired_model(model_a, layers)
    for alpha in (0.0, 0.4, 1.0):
        state = repair_state(work, lerp_state(model_a.state_dict(), model_b.state_dict(), alpha), layers,
                             [stats_a, stats_b], [1 - alpha, alpha], ds.train, ds.mean, ds.std, feed)
        work.load_state_dict(state)
        # outputs of every (layer, inserted BN) pair, and of the layer alone (z)
        got = unit_statistics(work, layers + [f"{x}.0" for x in layers], ds.train, ds.mean, ds.std, feed)
        for layer in layers:
            mu, sigma = target([stats_a, stats_b], [1 - alpha, alpha], layer)
            assert torch.allclose(got[layer][0], mu, atol=1e-5)
            z_var = got[f"{layer}.0"][1]  # BatchNorm's ε: var_out = σ_target²·var(z)/(var(z) + ε)
            assert torch.allclose(got[layer][1] * (z_var + EPS) / z_var, sigma**2, rtol=1e-4, atol=1e-7)
        if alpha in (0.0, 1.0):  # the identity at the endpoints
            ref = model_a if alpha == 0 else model_b
            x = data.normalize(ds.train.images, ds.mean, ds.std)
            with torch.no_grad():
                assert torch.allclose(work.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)


def test_repair_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, batchnorm=True)
    assert main([str(a), str(b), "--repair", "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    assert "--bn recompute" in err and err.count("\n") == 1
    assert main([str(a), "--direction", "random", "--repair", "--out", str(tmp_path / "y.h5")]) == 2
    assert "needs a segment" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    assert ck.load_checkpoint(a)  # inputs untouched


def test_repair_on_the_plane_through_three_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from minima.surface import SurfaceRequest
    from minima.surface import main as surface_main
    from minima.surface import run as surface_run

    ds = toy_dataset()
    a, b, c = (toy_checkpoint(tmp_path / f"{n}.pt", seed, ds, widths=(6, 5)) for n, seed in (("a", 1), ("b", 2),
                                                                                           ("c", 3)))
    common = dict(checkpoints=[a, b, c], x="0,0.5,1", y="0,0.4", device="cpu", plot=False, progress=False)
    plain = results.load_grid(surface_run(SurfaceRequest(out=tmp_path / "plain.h5", **common)))
    fixed = results.load_grid(surface_run(SurfaceRequest(out=tmp_path / "repair.h5", repair=True, **common)))
    assert '"repair": true' in fixed.attrs["config"]
    for i in (0, 2):  # (0, 0) is A and (1, 0) is B: REPAIR changes nothing there
        for key in ("train/loss", "test/loss", "test/accuracy"):
            assert fixed.values[key][i, 0] == pytest.approx(plain.values[key][i, 0], rel=1e-5, abs=1e-7), key
    assert abs(fixed.values["train/loss"][1, 1] - plain.values["train/loss"][1, 1]) > 1e-4
    assert surface_main([str(a), "--repair", "--out", str(tmp_path / "r.h5")]) == 2
    assert "three checkpoints" in capsys.readouterr().err
