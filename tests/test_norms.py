"""Norm and margin measures against direct float64 computations, their invariances, and the registered metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minima.geometry import norms
from minima.geometry.fold import fold_batchnorm


def _mlp(seed: int = 0, batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(12, 7)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.ReLU(), nn.Linear(7, 4)]
    net = nn.Sequential(*layers).double()
    if batchnorm:  # non-trivial running statistics and affine parameters
        bn = net[2]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _data(n: int = 40, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[:25], y[:25]), (x[25:], y[25:])]


def test_every_measure_equals_a_direct_float64_computation_on_a_two_layer_mlp() -> None:
    net, init, batches = _mlp(0), _mlp(7), _data()
    w1, b1 = net[1].weight.detach().numpy(), net[1].bias.detach().numpy()
    w2, b2 = net[3].weight.detach().numpy(), net[3].bias.detach().numpy()
    x = torch.cat([b[0] for b in batches]).reshape(40, -1).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    logits = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    correct = logits[np.arange(40), y]
    other = np.where(np.eye(4, dtype=bool)[y], -np.inf, logits).max(axis=1)
    gamma = abs(np.sort(correct - other)[40 // 10 - 1])
    fro = np.array([(w1 ** 2).sum(), (w2 ** 2).sum()])
    spec = np.array([np.linalg.svd(w1, compute_uv=False)[0] ** 2, np.linalg.svd(w2, compute_uv=False)[0] ** 2])
    path = (np.maximum(w1 ** 2 @ np.ones(12) + b1 ** 2, 0) @ (w2 ** 2).T + b2 ** 2).sum()
    i1, i2 = init[1].weight.detach().numpy(), init[3].weight.detach().numpy()
    dist = [w1 - i1, w2 - i2]
    found = norms.measures(net, (3, 2, 2), norms.margins(net, batches), init=init, adjust=False)
    expected = {
        "params": 12 * 7 + 7 * 4, "inverse_margin": 1 / gamma ** 2, "log_prod_of_spec": np.log(spec).sum(),
        "log_prod_of_spec_over_margin": np.log(spec).sum() - 2 * np.log(gamma),
        "fro_over_spec": (fro / spec).sum(), "log_prod_of_fro": np.log(fro).sum(),
        "log_sum_of_fro": np.log(2) + np.log(fro).sum() / 2, "param_norm": fro.sum(), "path_norm": path,
        "path_norm_over_margin": path / gamma ** 2, "fro_dist": sum((d ** 2).sum() for d in dist),
        "dist_spec_init": sum(np.linalg.svd(d, compute_uv=False)[0] ** 2 for d in dist),
        "log_spec_init_main": np.log(spec).sum() - 2 * np.log(gamma)
        + np.log(sum((d ** 2).sum() / s for d, s in zip(dist, spec, strict=True))),
    }
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-12), name
    adjusted = norms.measures(net, (3, 2, 2), norms.margins(net, batches), init=init)
    assert adjusted["log_prod_of_fro"] == pytest.approx(0.5 * (found["log_prod_of_fro"] - math.log(40)), rel=1e-12)
    assert adjusted["path_norm"] == pytest.approx(math.sqrt(found["path_norm"] / 40), rel=1e-12)
    assert set(found) == set(norms.MEASURES) - {"fisher_rao", "relative_flatness"}  # they need their terms' means


def test_a_convolutions_spectral_norm_is_that_of_its_dense_circular_matrix() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False).double()
    n = 5
    basis = torch.eye(2 * n * n, dtype=torch.float64).reshape(-1, 2, n, n)
    dense = conv(basis).reshape(2 * n * n, -1).T.detach().numpy()  # (out·n·n) × (in·n·n)
    assert norms.spectral_norm(conv.weight, (n, n)) == pytest.approx(np.linalg.svd(dense, compute_uv=False)[0],
                                                                     rel=1e-10)


def test_batchnorm_is_folded_first_and_the_eval_function_kept() -> None:
    net = _mlp(0, batchnorm=True)
    batches = _data()
    folded = fold_batchnorm(net)
    for x, _ in batches:
        torch.testing.assert_close(folded(x), net(x), rtol=1e-6, atol=1e-9)
    layers = norms.weight_layers(net, (3, 2, 2))
    assert [w.shape for _, w, _ in layers] == [(7, 12), (4, 7)]  # weights only: BatchNorm folded into the first
    scale = net[2].weight / torch.sqrt(net[2].running_var + net[2].eps)
    torch.testing.assert_close(layers[0][1], net[1].weight * scale[:, None])


def test_relu_rescaling_leaves_products_and_the_path_norm_and_changes_sums() -> None:
    net, batches = _mlp(2), _data()
    rescaled = _mlp(2)
    with torch.no_grad():
        rescaled[1].weight.mul_(3.0)
        rescaled[1].bias.mul_(3.0)
        rescaled[3].weight.div_(3.0)
    for x, _ in batches:  # the same function
        torch.testing.assert_close(rescaled(x), net(x), rtol=1e-12, atol=1e-12)
    a = norms.measures(net, (3, 2, 2), norms.margins(net, batches), adjust=False)
    b = norms.measures(rescaled, (3, 2, 2), norms.margins(rescaled, batches), adjust=False)
    for name in ("inverse_margin", "log_prod_of_spec", "log_prod_of_fro", "path_norm", "path_norm_over_margin",
                 "log_prod_of_spec_over_margin", "params", "log_sum_of_fro", "log_sum_of_spec", "fro_over_spec",
                 "log_spec_orig_main"):
        assert b[name] == pytest.approx(a[name], rel=1e-8, abs=1e-12), name  # documented invariant
    assert b["param_norm"] != pytest.approx(a["param_norm"], rel=1e-3)  # documented not invariant


def _toy_run(tmp_path: Path) -> Path:
    from minima.studies.train import TrainConfig, train
    from tests.test_train import _toy_data

    config = TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 4, 4], "widths": [6]}, epochs=2,
                         batch_size=8, optimizer="sgd", lr=0.1, out=str(tmp_path / "run"), progress=False)
    return train(config, dataset=_toy_data(32))


def test_the_norms_metric_measures_a_checkpoint_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    from minima.files import results
    from minima.studies.sharpness import measure, measure_request_type

    final = _toy_run(tmp_path)
    request = measure_request_type()
    out = measure(request(checkpoints=[final], metrics=["norms"], norms_init=str(final.parent / "init.pt"),
                          out=tmp_path / "n.h5"))
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    assert set(rows) == {f"norm_{n}" for n in norms.MEASURES}
    assert rows["norm_fro_dist"]["value"] > 0 and rows["norm_path_norm"]["samples"] == 32
    with pytest.raises(ValueError, match="need the initial weights: --norms-init"):
        measure(request(checkpoints=[final], metrics=["norms"], norm_measures=("fro_dist",), out=tmp_path / "x.h5"))
    with pytest.raises(ValueError, match="unknown \\['spectral'\\]"):
        measure(request(checkpoints=[final], metrics=["norms"], norm_measures=("spectral",), out=tmp_path / "y.h5"))


def test_gradient_noise_is_the_spread_of_batch_gradients() -> None:
    from minima.curvature.objective import DatasetObjective, FixedBatches
    from minima.curvature.registry import REGISTRY

    net, batches = _mlp(4), _data(48)
    obj = DatasetObjective(net, FixedBatches(batches, 48, torch.device("cpu"), torch.float64), bn="eval")
    x = obj.get_flat()
    metric = REGISTRY["gradient_noise"]
    (name, job), = metric.jobs({"noise_batch": 12})
    found = metric.compute(obj, x, obj.value(x), job, 0)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    grads = []
    for k in range(4):  # by hand: the gradient of the mean loss of each batch of 12
        net.zero_grad()
        nn.functional.cross_entropy(net(xs[12 * k:12 * (k + 1)]), ys[12 * k:12 * (k + 1)]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    g = torch.stack(grads)
    assert name == "gradient_noise_m12" and found["batches"] == 4
    assert found["value"] == pytest.approx(float(((g - g.mean(0)) ** 2).sum(1).mean()), rel=1e-10)
    assert metric.compute(obj, x, 0.0, {"m": 48}, 0)["value"] == pytest.approx(0.0, abs=1e-24)  # one batch: none


def test_the_fisher_rao_norm_is_the_empirical_fisher_norm_of_a_bias_free_relu_network() -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 5, bias=False),
                        nn.ReLU(), nn.Linear(5, 4, bias=False)).double().eval()
    batches = _data()
    terms = norms.fisher_rao_terms(net, batches)
    found = norms.measures(net, (3, 2, 2), norms.margins(net, batches), adjust=False,
                           fisher_rao_mean=float(terms.mean()))["fisher_rao"]
    direct = []  # E[⟨θ, ∇_θ ℓ(x, y)⟩²] sample by sample
    for x, y in batches:
        for i in range(len(y)):
            net.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
            direct.append(sum(float((p.detach() * p.grad).sum()) for p in net.parameters()) ** 2)
    assert found == pytest.approx(np.mean(direct), rel=1e-10)


def test_relative_flatness_is_its_double_sum_over_the_dense_feature_layer_hessian() -> None:
    net, batches = _mlp(6), _data()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    w = net[3].weight.detach().clone()  # (classes, features): w_s is column s
    phi = net[2](net[1](net[0](x))).detach()  # the features the last layer sees

    def loss(weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(phi @ weight.T + net[3].bias.detach(), y)

    hess = torch.autograd.functional.hessian(loss, w)  # (k, s, k', s′)
    trace_blocks = torch.einsum("ksku->su", hess)  # Tr(H_{s,s′}) = Σ_k ∂²L/∂W_ks∂W_ks′
    expected = float((w.T @ w * trace_blocks).sum())  # Σ_{s,s′} ⟨w_s, w_s′⟩ Tr(H_{s,s′})
    terms = norms.relative_flatness_terms(net, batches)
    assert float(terms.mean()) == pytest.approx(expected, rel=1e-10)
    rescaled = _mlp(6)  # features × 4, last weights ÷ 4: the same function, the same relative flatness
    with torch.no_grad():
        rescaled[1].weight.mul_(4.0)
        rescaled[1].bias.mul_(4.0)
        rescaled[3].weight.div_(4.0)
    assert float(norms.relative_flatness_terms(rescaled, batches).mean()) == pytest.approx(expected, rel=1e-10)
