"""Curvature per parameter block: block selection, and every blockwise metric against the dense Hessian block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minima import data
from minima.curvature.blocks import parameter_blocks
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.registry import get_metric
from minima.files import results
from minima.geometry.evaluate import Batching
from minima.models import build_model
from minima.sharpness import main as sharpness_main

from .helpers import logits_of_flat, toy_checkpoint, toy_dataset


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def _objective(model: nn.Module, ds: data.Dataset, bn: str) -> DatasetObjective:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    feed = Batching(20, dtype=torch.float64)
    return DatasetObjective(model.double(), FixedBatches.from_split(ds.train, ds.mean, ds.std, feed), bn=bn)


def _dense(obj: DatasetObjective) -> np.ndarray:
    eye = torch.eye(obj.numel, dtype=torch.float64)
    h = torch.stack([obj.hvp(eye[i]) for i in range(obj.numel)]).numpy()
    return 0.5 * (h + h.T)


CASES = [("mlp", "eval"), ("conv_bn", "eval"), pytest.param("conv_bn", "batch", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("net", "bn"), CASES)
def test_every_blockwise_metric_equals_the_dense_block(net: str, bn: str) -> None:
    torch.manual_seed(0)
    shape = (1, 4, 4)
    ds = data.synthetic(n_train=40, n_test=4, image_shape=shape, num_classes=3, seed=1)
    model = (build_model("mlp", 3, input_shape=list(shape), widths=[5]) if net == "mlp" else _conv_bn())
    obj = _objective(model, ds, bn)
    dense = _dense(obj)
    named = [(n, p.numel()) for n, p in zip(obj.names, obj.params, strict=True)]
    x = obj.get_flat()
    f0 = obj.value(x)
    blocks = parameter_blocks(named, "layers")
    assert sum(b.size for b in blocks) == obj.numel
    traces = []
    for b in blocks:
        sub = dense[np.ix_(b.index.numpy(), b.index.numpy())]
        job = {"block": b.label, "block_params": list(b.names), "block_size": b.size}
        k = min(2, b.size)
        eig = get_metric("hessian").compute(obj, x, f0, {**job, "k": k, "tol": 1e-10, "method": "lanczos"}, 0)
        np.testing.assert_allclose(eig["eigenvalues"], np.sort(np.linalg.eigvalsh(sub))[::-1][:k], rtol=1e-7,
                                   atol=1e-9)
        # Hutch++ with 3 × the block's size products sketches the whole block: its trace exactly
        tr = get_metric("trace").compute(obj, x, f0, {**job, "method": "hutchpp", "max_probes": 3 * b.size}, 0)
        assert tr["trace"] == pytest.approx(np.trace(sub), rel=1e-8, abs=1e-10)
        traces.append(tr["trace"])
        dens = get_metric("density").compute(obj, x, f0, {**job, "steps": min(b.size, 8), "probes": 2}, 0)
        assert dens["dimension"] == b.size and dens["weights"].sum() == pytest.approx(1.0)
        assert float((dens["weights"] * dens["nodes"]).sum()) == pytest.approx(
            _probe_mean(sub, b.size, 0, 2), rel=1e-7, abs=1e-10)
    # blocks partition the parameters: their traces add up to the whole network's
    assert sum(traces) == pytest.approx(np.trace(dense), rel=1e-8)


def _probe_mean(sub: np.ndarray, n: int, seed: int, probes: int) -> float:
    """The mean of qᵀHq/n over the Rademacher probes the density draws (its first moment exactly)."""
    from minima.curvature.hessian import _start_vector

    rng = np.random.default_rng(seed)
    qs = [_start_vector(rng, n, torch.device("cpu"), "rademacher").numpy() for _ in range(probes)]
    return float(np.mean([q @ sub @ q / n for q in qs]))


def test_block_selection_syntaxes_and_refusals() -> None:
    named = [(n, p.numel()) for n, p in _conv_bn().named_parameters()]
    layers = parameter_blocks(named, "layers")
    assert [b.label for b in layers] == ["0", "1", "4"] and layers[1].names == ("1.weight", "1.bias")
    assert [b.label for b in parameter_blocks(named, "modules")] == ["0", "1", "4"]
    picked = parameter_blocks(named, r"^0\.,^4\.")
    assert [(b.label, b.names) for b in picked] == [(r"^0\.", ("0.weight", "0.bias")),
                                                    (r"^4\.", ("4.weight", "4.bias"))]
    assert picked[1].index.tolist() == list(range(named[0][1] + named[1][1] + named[2][1] + named[3][1],
                                                  sum(n for _, n in named)))
    assert parameter_blocks(named, "all") == []
    with pytest.raises(ValueError, match="selects no parameter; the parameters are: 0.weight, 0.bias"):
        parameter_blocks(named, "conv")
    with pytest.raises(ValueError, match="both select 0.weight"):
        parameter_blocks(named, r"0\.,weight")


def test_blocks_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6,))
    out = tmp_path / "b.h5"
    assert sharpness_main([str(a), "--metrics", "hessian", "trace", "--topk", "1", "--blocks", "layers",
                           "--trace-max-probes", "20", "--out", str(out)]) == 0
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    assert set(rows) == {"hessian_top1@net.1", "hessian_top1@net.3", "trace@net.1", "trace@net.3"}
    assert rows["hessian_top1@net.1"]["block_size"] == 6 * 48 + 6
    assert "net.1.weight" in rows["trace@net.1"]["block_params"]
    capsys.readouterr()
    assert sharpness_main([str(a), "--metrics", "hessian", "--blocks", "conv", "--out", str(tmp_path / "c.h5")]) == 2
    err = capsys.readouterr().err
    assert "selects no parameter; the parameters are: net.1.weight" in err and err.count("\n") == 1
    assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow  # kept out of the one-minute fast suite
def test_per_block_densities_are_drawn_as_small_multiples(tmp_path: Path) -> None:
    from minima.plot import main as plot_main

    from .helpers import assert_drawn

    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6,))
    out = tmp_path / "d.h5"
    assert sharpness_main([str(a), "--metrics", "density", "--blocks", "layers", "--density-probes", "2",
                           "--density-steps", "6", "--out", str(out)]) == 0
    assert plot_main([str(out)]) == 0
    assert_drawn(tmp_path / "d_density.png")
    from minima.figures import plot_block_densities
    from minima.files.results import load_sharpness

    fig = plot_block_densities([r for r in load_sharpness(out) if str(r["metric"]).startswith("density")])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["net.1 · Linear 48→6\n294 parameters", "net.3 · Linear 6→3\n21 parameters"], titles


def _jacobian_ggn(model: nn.Module, ds: data.Dataset) -> torch.Tensor:
    """Dense (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i with J from torch.autograd (eval mode)."""
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64)
    logits, theta = logits_of_flat(model, x)
    jac = torch.autograd.functional.jacobian(logits, theta)  # N × C × n
    prob = torch.softmax(logits(theta), dim=1)
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(x)


def test_ggn_equals_the_dense_gauss_newton_matrix_and_the_hessian_of_a_linear_model() -> None:
    from minima.curvature.hessian import ggn_operator

    torch.manual_seed(0)
    ds = data.synthetic(n_train=40, n_test=4, image_shape=(1, 4, 4), num_classes=3, seed=2)
    model = build_model("mlp", 3, input_shape=[1, 4, 4], widths=[5]).double().eval()
    obj = _objective(model, ds, "eval")
    eye = torch.eye(obj.numel, dtype=torch.float64)
    ggn = torch.stack([obj.ggn_vp(eye[i]) for i in range(obj.numel)])
    torch.testing.assert_close(ggn, _jacobian_ggn(model, ds), rtol=1e-9, atol=1e-12)
    assert float(torch.linalg.eigvalsh(0.5 * (ggn + ggn.T)).min()) >= -1e-12  # positive semi-definite
    assert float((ggn - torch.from_numpy(_dense(obj))).abs().max()) > 1e-6  # not the Hessian of a ReLU network
    linear = build_model("mlp", 3, input_shape=[1, 4, 4], widths=[]).double().eval()  # logits linear in θ
    lin = _objective(linear, ds, "eval")
    eye = torch.eye(lin.numel, dtype=torch.float64)
    torch.testing.assert_close(torch.stack([lin.ggn_vp(eye[i]) for i in range(lin.numel)]),
                               torch.from_numpy(_dense(lin)), rtol=1e-9, atol=1e-12)
    op = ggn_operator(obj)
    first = torch.zeros(obj.numel, dtype=torch.float64)
    first[0] = 1.0
    torch.testing.assert_close(op.apply(first), ggn[0], rtol=1e-12, atol=1e-14)
    assert op.products == 1


def test_ggn_results_on_the_command_line(tmp_path: Path) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6,), batchnorm=True)
    out = tmp_path / "g.h5"
    assert sharpness_main([str(a), "--metrics", "hessian", "--topk", "1", "--curvature", "ggn", "--blocks", "layers",
                           "--out", str(out)]) == 0
    names = {r["metric"] for r in results.load_sharpness(out)}
    assert names == {"hessian_top1_ggn@net.1", "hessian_top1_ggn@net.2", "hessian_top1_ggn@net.4"}
    assert all(r["value"] >= -1e-9 for r in results.load_sharpness(out))  # PSD: no negative top eigenvalue
