from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minima import data
from minima.curvature.hessian import (
    CountingOperator,
    hessian_diagonal,
    hessian_operator,
    hutchinson_trace,
    slq_density,
    squared_frobenius,
    top_eigenvalues,
    xdiag_diagonal,
)
from minima.curvature.objective import DatasetObjective, FixedBatches, NondeterministicLossError
from minima.geometry.evaluate import Batching
from minima.models import build_model
from minima.sharpness import (
    DenseSubspace,
    RandomSubspace,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
)

from .helpers import free_port, logits_of_flat, toy_checkpoint, toy_dataset


def _setup(seed: int = 0, batchnorm: bool = False) -> tuple[torch.nn.Module, data.Dataset]:
    ds = data.synthetic(n_train=60, n_test=10, image_shape=(1, 2, 2), num_classes=3, seed=seed)
    torch.manual_seed(seed)
    model = build_model("mlp", num_classes=3, input_shape=(1, 2, 2), widths=(5,), batchnorm=batchnorm).double()
    return model, ds


def _objective(model: torch.nn.Module, ds: data.Dataset, rank: int = 0, world_size: int = 1,
               **kw: object) -> DatasetObjective:
    batches = FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(25, dtype=torch.float64), rank=rank,
                                      world_size=world_size)
    kw.setdefault("hvp_cache_bytes", 2**30)
    return DatasetObjective(model, batches, **kw)


def _dense_hessian(model: torch.nn.Module, ds: data.Dataset) -> torch.Tensor:
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64)
    logits_of, theta = logits_of_flat(model, x)

    def f(theta: torch.Tensor) -> torch.Tensor:
        logits = logits_of(theta)
        return (torch.logsumexp(logits, 1) - logits[torch.arange(len(x)), ds.train.labels]).mean()

    return torch.autograd.functional.hessian(f, theta)


def test_hvp_and_eigenvalues_match_dense_hessian() -> None:
    model, ds = _setup()
    obj = _objective(model, ds)
    dense = _dense_hessian(model.eval(), ds)
    v = torch.randn(obj.numel, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    forward = _objective(model, ds, hvp_mode="forward")  # jvp of grad: the cross-check mode
    torch.testing.assert_close(forward.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    op = hessian_operator(obj)
    exact = np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1][:3]
    for method in ("lanczos", "arpack"):
        before = op.products
        res = top_eigenvalues(op, k=3, tol=1e-12, method=method, ncv=obj.numel - 1)
        np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-6)
        assert res.converged and np.all(res.residuals <= 1e-6 * np.abs(exact[0]))
        assert res.hvps == op.products - before  # every product counted, residual checks included
    tr = hutchinson_trace(op, rtol=2e-2, max_probes=100, seed=1)
    assert abs(tr.trace - float(torch.trace(dense))) <= 3 * tr.stderr
    nodes, weights = slq_density(op, steps=obj.numel, probes=3)
    assert weights.sum() == pytest.approx(1.0) and nodes.max() == pytest.approx(exact[0], rel=1e-6)


def test_batch_mode_and_determinism_check() -> None:
    model, ds = _setup(batchnorm=True)
    obj = _objective(model, ds, bn="batch")
    obj.check_deterministic()
    v = torch.randn(obj.numel, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), _objective(model, ds, bn="batch", hvp_mode="reverse").hvp(v),
                               rtol=1e-10, atol=1e-12)
    assert obj.value() != _objective(model, ds, bn="eval").value()
    obj.model.net[0].register_forward_hook(lambda m, i, o: o + 1e-3 * torch.randn_like(o))
    with pytest.raises(NondeterministicLossError, match="dropout or augmentation"):
        obj.check_deterministic()


def _quadratic(h: torch.Tensor, c: torch.Tensor, f0: float):
    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        d = x - c
        return float(0.5 * (h * d * d).sum() + f0), h * d
    return value_and_grad


def test_keskar_on_a_quadratic_matches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 20
    h = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    x = c + torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    f0 = 0.7
    fg = _quadratic(h, c, f0)
    fx = fg(x)[0]
    phis = []
    for eps in (1e-3, 1e-2, 1e-1):
        b = eps * (x.abs() + 1)
        corner = float(0.5 * (h * ((x - c).abs() + b) ** 2).sum() + f0)
        res = keskar_sharpness(fg, x, eps, maxiter=100)
        assert res.phi == pytest.approx(100 * (corner - fx) / (1 + fx), rel=1e-8)
        phis.append(res.phi)
        sub = keskar_sharpness(fg, x, eps, subspace=DenseSubspace(torch.eye(n, dtype=torch.float64)), maxiter=100)
        assert sub.phi == pytest.approx(res.phi, rel=1e-10)
    assert phis[0] < phis[1] < phis[2]
    assert keskar_sharpness(fg, x, 1e-2, maxiter=1).hit_iteration_limit


def test_random_subspace_products_and_pseudo_inverse() -> None:
    sub = RandomSubspace(50, 7, seed=3, block=3)
    a = sub.columns(0, 7)
    y, g = torch.randn(7, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(sub.matvec(y), a @ y)
    torch.testing.assert_close(sub.rmatvec(g), a.T @ g)
    torch.testing.assert_close(sub.gram(), a.T @ a)
    torch.testing.assert_close(sub.pinv_apply(g), torch.linalg.pinv(a) @ g, rtol=1e-9, atol=1e-10)
    assert torch.equal(RandomSubspace(50, 7, seed=3).columns(2, 4), a[:, 2:4])  # seeded per column
    uncached = RandomSubspace(50, 7, seed=3, block=3, max_cache_bytes=0)
    assert uncached._cache is None and torch.equal(uncached.columns(0, 7), a)
    torch.testing.assert_close(uncached.gram(), a.T @ a)


def test_dinh_rescaling_changes_keskar_and_lambda_max_but_not_adaptive() -> None:
    model, ds = _setup(seed=2)
    obj = _objective(model, ds)
    rescaled = build_model("mlp", num_classes=3, input_shape=(1, 2, 2), widths=(5,)).double()
    c = 5.0
    with torch.no_grad():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["net.1.weight"] *= c
        state["net.1.bias"] *= c
        state["net.3.weight"] /= c
        rescaled.load_state_dict(state)
    obj2 = _objective(rescaled, ds)
    w, w2 = obj.get_flat(), obj2.get_flat()
    assert obj2.value() == pytest.approx(obj.value(), rel=1e-12)  # the same function
    k1 = keskar_sharpness(obj.value_and_grad, w, 1e-2).phi
    k2 = keskar_sharpness(obj2.value_and_grad, w2, 1e-2).phi
    assert abs(k1 - k2) > 0.1 * max(k1, k2)
    obj.set_flat(w)
    obj2.set_flat(w2)
    l1 = top_eigenvalues(hessian_operator(obj), k=1, tol=1e-10).eigenvalues[0]
    l2 = top_eigenvalues(hessian_operator(obj2), k=1, tol=1e-10).eigenvalues[0]
    assert abs(l1 - l2) > 0.1 * max(l1, l2)
    a1 = adaptive_sharpness(obj.value_and_grad, w, 0.05)
    a2 = adaptive_sharpness(obj2.value_and_grad, w2, 0.05)
    assert a1.sharpness > 0 and a2.sharpness == pytest.approx(a1.sharpness, rel=1e-8)
    v1 = average_sharpness(obj.value, w, 0.05, samples=5, seed=1)
    v2 = average_sharpness(obj2.value, w2, 0.05, samples=5, seed=1)
    assert v2.sharpness == pytest.approx(v1.sharpness, rel=1e-8)



def _objective_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, ds = _setup()
    obj = _objective(model, ds, rank=rank, world_size=2)
    v = torch.linspace(-1, 1, obj.numel, dtype=torch.float64)
    f, g = obj.value_and_grad()
    if rank == 0:
        out["f"], out["g"], out["hv"] = f, g, obj.hvp(v)
    else:
        obj.hvp(v)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_objective_equals_one_rank() -> None:
    model, ds = _setup()
    obj = _objective(model, ds)
    f, g = obj.value_and_grad()
    hv = obj.hvp(torch.linspace(-1, 1, obj.numel, dtype=torch.float64))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_objective_worker, args=(free_port(), out), nprocs=2, join=True)
        assert out["f"] == pytest.approx(f, rel=1e-12)
        torch.testing.assert_close(out["g"], g, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out["hv"], hv, rtol=1e-10, atol=1e-14)


def test_hvp_with_eval_batchnorm_matches_dense_hessian() -> None:
    model, ds = _setup(seed=3, batchnorm=True)
    bn = model.net[2]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    obj = _objective(model, ds, bn="eval")
    dense = _dense_hessian(model.eval(), ds)
    v = torch.randn(obj.numel, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert type(obj.model.net[2]).forward is obj.model.net[2].forward.__func__  # patch removed after the HVP


def test_lanczos_residuals_from_the_recurrence_are_the_true_residuals() -> None:
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([50.0, 20.0, 10.0, 9.0, 5.0], dtype=torch.float64),
                          torch.rand(195, generator=gen, dtype=torch.float64) * 4 - 1])
    h = (q * spectrum) @ q.T
    op = CountingOperator(200, lambda v: h @ v)
    res = top_eigenvalues(op, k=4, tol=1e-4, return_vectors=True)
    assert res.converged and res.method == "lanczos" and res.hvps == res.ncv  # one product per Lanczos step
    vecs = res.eigenvectors
    explicit = np.linalg.norm(h.numpy() @ vecs - vecs * res.eigenvalues, axis=0)
    np.testing.assert_allclose(res.residuals, explicit, rtol=1e-6, atol=1e-10)
    assert np.all(res.residuals <= 1e-4 * np.abs(res.eigenvalues))
    np.testing.assert_allclose(res.eigenvalues, [50, 20, 10, 9], rtol=1e-4)  # |λ − λ̂| ≤ r
    arpack = top_eigenvalues(CountingOperator(200, lambda v: h @ v), k=4, tol=1e-4, method="arpack")
    np.testing.assert_allclose(arpack.eigenvalues, res.eigenvalues, rtol=1e-4)
    short = top_eigenvalues(CountingOperator(200, lambda v: h @ v), k=4, tol=1e-12, max_steps=6)
    assert not short.converged and short.hvps == 6 and np.any(short.residuals > 1e-12 * np.abs(short.eigenvalues))
    with pytest.raises(ValueError, match="choose one of"):
        top_eigenvalues(op, k=1, method="power")
    # warm-started from the top eigenvector of a nearby matrix: the same answer to the tolerance, fewer products;
    # with ARPACK too; a start of the wrong size is refused
    nearby = (q * (spectrum + 0.5 * torch.rand(200, generator=gen, dtype=torch.float64))) @ q.T
    start = torch.from_numpy(top_eigenvalues(CountingOperator(200, lambda v: nearby @ v), k=1, tol=1e-6,
                                             return_vectors=True).eigenvectors[:, 0])
    cold = top_eigenvalues(CountingOperator(200, lambda v: h @ v), k=1, tol=1e-6)
    for method in ("lanczos", "arpack"):
        warm = top_eigenvalues(CountingOperator(200, lambda v: h @ v), k=1, tol=1e-6, warm_start=start, method=method)
        np.testing.assert_allclose(warm.eigenvalues, [50.0], rtol=1e-6)
    warm = top_eigenvalues(CountingOperator(200, lambda v: h @ v), k=1, tol=1e-6, warm_start=start)
    assert warm.hvps < cold.hvps
    with pytest.raises(ValueError, match="the warm start has 199 entries; the operator has size 200"):
        top_eigenvalues(op, k=1, warm_start=start[:199])


def test_hvp_graph_cache_is_reused_bounded_and_dropped_when_theta_moves() -> None:
    model, ds = _setup(seed=4)
    obj = _objective(model, ds)  # 60 samples in batches of 25, 25, 10
    forwards = []
    obj.model.net[1].register_forward_hook(lambda m, i, o: forwards.append(1))
    dense = _dense_hessian(model.eval(), ds)
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(obj.numel, generator=gen, dtype=torch.float64) for _ in range(3)]
    for i, v in enumerate(vs):
        torch.testing.assert_close(obj.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
        assert len(forwards) == 3 and obj.hvp_cache_info["batches"] == 3, i  # graphs built once, then reused
    full = obj.hvp_cache_info["bytes"]
    assert full > 0

    moved = obj.get_flat() + 0.3 * torch.randn(obj.numel, generator=gen, dtype=torch.float64)
    obj.set_flat(moved)
    assert obj.hvp_cache_info == {"batches": 0, "bytes": 0, "limit": obj.hvp_cache_bytes}
    shifted = _setup(seed=4)[0]
    torch.nn.utils.vector_to_parameters(moved, shifted.parameters())
    torch.testing.assert_close(obj.hvp(vs[0]), _dense_hessian(shifted.eval(), ds) @ vs[0], rtol=1e-10, atol=1e-12)

    checked = _objective(model, ds)
    runs = []
    checked.model.net[1].register_forward_hook(lambda m, i, o: runs.append(1))
    checked.check_deterministic()  # two products that both run the network; the second one's graphs are kept
    assert len(runs) == 6 and checked.hvp_cache_info["batches"] == 3

    for limit, kept in ((0, 0), (full // 2, 1)):
        small = _objective(model, ds, hvp_cache_bytes=limit)
        for v in vs[:2]:
            torch.testing.assert_close(small.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
        assert small.hvp_cache_info["batches"] == kept and small.hvp_cache_info["bytes"] <= limit


def test_conv_objective_matches_dense_hessian_in_every_layout() -> None:
    """A tiny conv net with eval-mode BatchNorm: f, ∇f and H·v (folded BN, weight-only derivatives of the
    data convolution, stored graphs) equal the dense float64 reference, whatever the memory layout."""
    ds = data.synthetic(n_train=40, n_test=10, image_shape=(3, 4, 4), num_classes=3, seed=6)
    torch.manual_seed(6)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    dense = _dense_hessian(model, ds)
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    results = {}
    for layout in (None, False, True):
        obj = _objective(model, ds, channels_last=layout)
        assert obj.first_order_channels_last == (layout is None)
        results[layout] = obj.value_and_grad()
        for _ in range(2):  # building the graph, then from the stored graph
            torch.testing.assert_close(obj.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    for layout in (None, True):
        assert results[layout][0] == pytest.approx(results[False][0], rel=1e-13)
        torch.testing.assert_close(results[layout][1], results[False][1], rtol=1e-11, atol=1e-13)


def test_slq_density_moments_are_the_probes_quadratic_forms() -> None:
    """Σ τ_j θ_j^k = qᵀH^kq/n exactly for k ≤ 2m − 1 (the quadrature of full Lanczos), which holds only with the
    weights τ_j = (first components of T_m's eigenvectors)²; and within the stochastic error of tr(H^k)/n."""
    from minima.curvature.hessian import _start_vector, broadened, spectral_density

    model, ds = _setup()
    obj = _objective(model, ds)
    dense = _dense_hessian(model.eval(), ds).numpy()
    n = obj.numel
    r = spectral_density(hessian_operator(obj), steps=n, probes=6, seed=3)
    assert r.weights.sum() == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    probes = [_start_vector(rng, n, torch.device("cpu"), "rademacher").numpy() for _ in range(6)]
    for k in (1, 2, 3):
        quad = np.mean([q @ np.linalg.matrix_power(dense, k) @ q / n for q in probes])
        assert float((r.weights * r.nodes**k).sum()) == pytest.approx(quad, rel=1e-8)
    for k in (1, 2):
        exact = np.trace(np.linalg.matrix_power(dense, k)) / n
        samples = [q @ np.linalg.matrix_power(dense, k) @ q / n for q in probes]
        assert abs(float((r.weights * r.nodes**k).sum()) - exact) <= 4 * np.std(samples, ddof=1) / np.sqrt(6)
    # the broadened density integrates to 1 for any width
    grid = np.linspace(r.nodes.min() - 1, r.nodes.max() + 1, 20001)
    for width in (0.01, 0.1):
        dens = broadened(r.nodes, r.weights, grid, width)
        assert float(np.sum((dens[1:] + dens[:-1]) * np.diff(grid)) / 2) == pytest.approx(1.0, abs=1e-6)


def test_hutchpp_beats_hutchinson_on_a_spectrum_with_a_few_large_eigenvalues() -> None:
    from minima.curvature.hessian import hutchpp_trace

    rng = np.random.default_rng(0)
    n = 300
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([[400.0, 250.0, 120.0, 80.0, 50.0], rng.uniform(0, 1, n - 5)])
    h = torch.from_numpy((basis * eigenvalues) @ basis.T)
    exact = float(eigenvalues.sum())
    errors = {"hutchinson": [], "hutchpp": []}
    for seed in range(10):
        op = CountingOperator(n, lambda v: h @ v)
        r = hutchinson_trace(op, rtol=0.0, min_probes=30, max_probes=30, seed=seed)
        errors["hutchinson"].append(abs(r.trace - exact))
        op = CountingOperator(n, lambda v: h @ v)
        r = hutchpp_trace(op, products=30, seed=seed)
        assert r.hvps == 30
        errors["hutchpp"].append(abs(r.trace - exact))
    assert np.mean(errors["hutchpp"]) < 0.2 * np.mean(errors["hutchinson"]), errors


def test_smallest_eigenvalues_of_a_planted_indefinite_spectrum() -> None:
    """Issue 29 item 1: the algebraically smallest eigenvalues (negative ones) to 1e-6, by Lanczos and ARPACK, with
    the same residual reporting as the largest; residual bounds that hold."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    spectrum = np.concatenate([[-3.0, -1.5, -0.2], np.linspace(0.01, 1.0, 144), [5.0, 9.0, 20.0]])
    h = torch.from_numpy(q @ np.diag(spectrum) @ q.T)
    for method in ("lanczos", "arpack"):
        op = CountingOperator(150, lambda v: h @ v)
        low = top_eigenvalues(op, k=3, tol=1e-9, method=method, which="smallest", max_steps=150, ncv=60)
        np.testing.assert_allclose(low.eigenvalues, [-3.0, -1.5, -0.2], atol=1e-6)
        assert low.converged and low.hvps == op.products
        assert np.all(np.abs(low.eigenvalues - [-3.0, -1.5, -0.2]) <= low.residuals + 1e-12)
    high = top_eigenvalues(CountingOperator(150, lambda v: h @ v), k=2, tol=1e-9, max_steps=150)
    np.testing.assert_allclose(high.eigenvalues, [20.0, 9.0], atol=1e-6)  # unchanged for the largest
    with pytest.raises(ValueError, match="largest' or 'smallest"):
        top_eigenvalues(CountingOperator(150, lambda v: h @ v), which="both")


def test_smallest_hessian_eigenvalue_of_a_network_and_the_metric_names(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """The network's dense Hessian is indefinite at random weights: λ_min < 0 found by the metric to 1e-6; the
    results are ``hessian_top{k}`` (unchanged, so earlier files resume) and ``hessian_bottom{k}``; a probe asking
    for both ends is refused in one line."""
    from minima.curvature.probes import parse_probes
    from minima.files import results
    from minima.sharpness import main as sharpness_main

    model, ds = _setup()
    dense = _dense_hessian(model.eval(), ds)
    exact = np.sort(np.linalg.eigvalsh(dense.numpy()))
    assert exact[0] < 0
    low = top_eigenvalues(hessian_operator(_objective(model, ds)), k=2, tol=1e-10, which="smallest")
    np.testing.assert_allclose(low.eigenvalues, exact[:2], atol=1e-6)
    ck = toy_checkpoint(tmp_path / "a.pt", 1, toy_dataset())
    out = tmp_path / "h.h5"
    assert sharpness_main([str(ck), "--metrics", "hessian", "--topk", "1", "--eig-which", "both", "--eig-tol",
                           "1e-8", "--dtype", "float64", "--out", str(out)]) == 0
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    assert set(rows) == {"hessian_top1", "hessian_bottom1"}
    assert rows["hessian_bottom1"]["value"] <= rows["hessian_top1"]["value"]
    with pytest.raises(SystemExit) as stop:
        sharpness_main([str(ck), "--metrics", "hessian", "--eig-which", "middle", "--out", str(out)])
    assert stop.value.code == 2 and "--eig-which: invalid choice: 'middle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="one end of the spectrum"):
        parse_probes(["hessian:10:eig_which=both"], 10, "sgd")
    assert parse_probes(["hessian:10:eig_which=smallest"], 10, "sgd")[0].params == (("eig_which", "smallest"),)


def test_diagonal_and_squared_frobenius_estimators_on_a_planted_matrix() -> None:
    """Issue 29 item 2: Hutchinson's diagonal is unbiased and its standard errors cover the truth at the stated
    rate (≈ 95 % within 2 SE); the exact diagonal of a small operator is exact; tr(H²) matches ‖H‖_F² within 3 SE
    and Σλ² of the spectrum."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((80, 80))
    h = torch.from_numpy((a + a.T) / 2)
    truth = np.diag(h.numpy())
    est = hessian_diagonal(CountingOperator(80, lambda v: h @ v), probes=400, seed=1)
    covered = np.mean(np.abs(est.diagonal - truth) <= 2 * est.stderr)
    assert 0.88 <= covered <= 1.0 and est.hvps == 400 and not est.exact
    # unbiased: over many coordinates the errors average out far below one standard error each
    assert abs(np.mean((est.diagonal - truth) / est.stderr)) < 0.3
    exact = hessian_diagonal(CountingOperator(80, lambda v: h @ v), exact_below=100)
    np.testing.assert_allclose(exact.diagonal, truth, rtol=0, atol=1e-12)
    assert exact.exact and exact.hvps == 80 and np.all(exact.stderr == 0)
    fro = squared_frobenius(CountingOperator(80, lambda v: h @ v), rtol=5e-3, max_probes=400, seed=2)
    dense = float((h ** 2).sum())
    assert abs(fro.trace - dense) <= 3 * fro.stderr
    assert dense == pytest.approx(float(np.sum(np.linalg.eigvalsh(h.numpy()) ** 2)), rel=1e-10)


@pytest.mark.slow  # three hundred exact products
def test_diagonal_and_trace_sq_metrics_on_a_network(tmp_path: Path) -> None:
    """The metrics on a checkpoint: the exact diagonal equals the dense Hessian's (float64), per tensor and per
    layer block; tr(H²) is within 3 SE of the dense ‖H‖_F²."""
    from minima.files import checkpoint as ck
    from minima.files import results
    from minima.sharpness import main as sharpness_main

    ds = toy_dataset()
    path = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    model, _meta = ck.load_model(path)
    dense = _dense_hessian(model.double().eval(), ds)
    out = tmp_path / "d.h5"
    assert sharpness_main([str(path), "--metrics", "diagonal", "trace_sq", "--diag-exact-below", "100000",
                           "--trace-sq-rtol", "0.05", "--trace-sq-max-probes", "60", "--dtype", "float64",
                           "--out", str(out)]) == 0
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    diag = rows["diagonal_probes100"]
    np.testing.assert_allclose(diag["diagonal"], np.diag(dense.numpy()), rtol=1e-8, atol=1e-12)
    assert diag["value"] == pytest.approx(float(np.sum(np.diag(dense.numpy()) ** 2)), rel=1e-8)
    import json
    per = json.loads(diag["per_tensor"]) if isinstance(diag["per_tensor"], str) else diag["per_tensor"]
    assert sum(t["size"] for t in per.values()) == dense.shape[0]
    assert sum(t["sum"] for t in per.values()) == pytest.approx(float(torch.trace(dense)), rel=1e-8)
    sq = rows["trace_sq"]
    assert abs(sq["value"] - float((dense ** 2).sum())) <= 3 * sq["stderr"]


@pytest.mark.slow  # three hundred exact products per block run
def test_the_diagonal_per_layer_block_is_the_whole_diagonal_in_pieces(tmp_path: Path) -> None:
    from minima.files import checkpoint as ck
    from minima.files import results
    from minima.sharpness import main as sharpness_main

    ds = toy_dataset()
    path = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    model, _meta = ck.load_model(path)
    dense = _dense_hessian(model.double().eval(), ds)
    blocks = tmp_path / "b.h5"
    assert sharpness_main([str(path), "--metrics", "diagonal", "--diag-exact-below", "100000", "--blocks", "layers",
                           "--dtype", "float64", "--out", str(blocks)]) == 0
    parts = np.concatenate([r["diagonal"] for r in sorted(results.load_sharpness(blocks),
                                                          key=lambda r: int(r["block"].split(".")[1]))])
    np.testing.assert_allclose(parts, np.diag(dense.numpy()), rtol=1e-8, atol=1e-12)


def _dense_jacobian_and_probs(model: torch.nn.Module, ds: data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """J (N × C × P, the logits' Jacobian in θ) and the softmax probabilities (N × C), in float64."""
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64)
    logits_of, theta = logits_of_flat(model, x)
    jac = torch.autograd.functional.jacobian(logits_of, theta)
    return jac, torch.softmax(logits_of(theta), dim=1)


def test_fisher_operators_equal_their_dense_definitions() -> None:
    """Issue 29 item 3: the empirical Fisher is (1/N) Σ g_i g_iᵀ with the data's labels (dense per-sample gradients,
    to 1e-10, for cross-entropy and MSE); the exact Fisher Σ_c p_ic g_ic g_icᵀ / N equals the GGN (the identity
    behind the Monte-Carlo Fisher), and the Monte-Carlo Fisher is a fixed PSD matrix per seed whose mean over seeds
    approaches the GGN."""
    model, ds = _setup()
    jac, prob = _dense_jacobian_and_probs(model.eval(), ds)
    n, c, _ = jac.shape
    onehot = torch.nn.functional.one_hot(ds.train.labels, c).to(torch.float64)
    grads = torch.einsum("nc,ncp->np", prob - onehot, jac)  # per-sample gradients of the cross-entropy
    ef_dense = grads.T @ grads / n
    exact = sum(torch.einsum("n,np,nq->pq", prob[:, k], g, g) for k in range(c)
                for g in [torch.einsum("nc,ncp->np", prob - torch.nn.functional.one_hot(
                    torch.full((n,), k), c).to(torch.float64), jac)]) / n
    obj = _objective(model, ds)
    eye = torch.eye(obj.numel, dtype=torch.float64)
    ggn = torch.stack([obj.ggn_vp(e) for e in eye], dim=1)
    torch.testing.assert_close(exact, ggn, rtol=1e-10, atol=1e-12)  # exact Fisher = GGN for cross-entropy
    v = torch.randn(obj.numel, dtype=torch.float64)
    torch.testing.assert_close(obj.fisher_vp(v, "empirical"), ef_dense @ v, rtol=1e-10, atol=1e-12)
    # MSE: r = f − y
    mse = _objective(model, ds, loss="mse")
    logits_of, theta = logits_of_flat(model, data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64))
    g_mse = torch.einsum("nc,ncp->np", logits_of(theta) - onehot, jac)
    torch.testing.assert_close(mse.fisher_vp(v, "empirical"), g_mse.T @ g_mse @ v / n, rtol=1e-10, atol=1e-12)
    # Monte-Carlo: the same matrix at every product for one seed, PSD, another for another seed, mean → GGN
    assert torch.equal(obj.fisher_vp(v, "mc", seed=3), obj.fisher_vp(v, "mc", seed=3))
    assert not torch.equal(obj.fisher_vp(v, "mc", seed=3), obj.fisher_vp(v, "mc", seed=4))
    assert float(v @ obj.fisher_vp(v, "mc", seed=3)) >= 0
    mean = sum(obj.fisher_vp(v, "mc", seed=s) for s in range(200)) / 200
    assert float(torch.linalg.vector_norm(mean - ggn @ v) / torch.linalg.vector_norm(ggn @ v)) < 0.05
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        obj.fisher_vp(v, "true")


def test_curvature_ef_and_fisher_name_their_results(tmp_path: Path) -> None:
    """``--curvature ef`` / ``fisher`` make the curvature metrics measure the Fisher matrices: results
    ``<name>_ef`` / ``<name>_fisher``; λ_max of the empirical Fisher equals the dense one's."""
    from minima.files import checkpoint as ck
    from minima.files import results
    from minima.sharpness import main as sharpness_main

    ds = toy_dataset()
    path = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    model, _meta = ck.load_model(path)
    jac, prob = _dense_jacobian_and_probs(model.double().eval(), ds)
    grads = torch.einsum("nc,ncp->np", prob - torch.nn.functional.one_hot(ds.train.labels, 3).to(torch.float64), jac)
    top = float(torch.linalg.eigvalsh(grads.T @ grads / len(grads))[-1])
    for kind in ("ef", "fisher"):
        out = tmp_path / f"{kind}.h5"
        assert sharpness_main([str(path), "--metrics", "hessian", "--topk", "1", "--eig-tol", "1e-9", "--curvature",
                               kind, "--dtype", "float64", "--out", str(out)]) == 0
        (row,) = results.load_sharpness(out)
        assert row["metric"] == f"hessian_top1_{kind}" and row["value"] > 0
        if kind == "ef":
            assert row["value"] == pytest.approx(top, rel=1e-7)


def test_keskar_phi_through_the_direct_lbfgsb_driver_equals_scipy_minimize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29 item 5: φ with scipy's L-BFGS-B routine driven directly (no per-variable Python loops) equals φ with
    ``scipy.optimize.minimize`` to the last bit — the same iterates, evaluations, iterations and message — on a
    small network, in the full space and a random subspace, for two ε."""
    from minima.curvature import lbfgsb, measures
    from minima.curvature.measures import RandomSubspace, keskar_sharpness

    assert lbfgsb._direct_works()  # the SciPy installed here takes the direct path
    model, ds = _setup()
    obj = _objective(model, ds)
    x = obj.get_flat()
    runs = {}
    for driver in ("direct", "minimize"):
        if driver == "minimize":
            monkeypatch.setattr(measures, "minimize_box", lbfgsb._with_minimize)
        runs[driver] = [keskar_sharpness(obj.value_and_grad, x, eps, subspace=sub, maxiter=10)
                        for eps in (1e-3, 5e-3) for sub in (None, RandomSubspace(obj.numel, 4, seed=0))]
    for a, b in zip(runs["direct"], runs["minimize"], strict=True):
        assert (a.phi, a.f_max, a.function_evals, a.iterations, a.message) == (
            b.phi, b.f_max, b.function_evals, b.iterations, b.message)
    assert any(r.iterations > 1 for r in runs["direct"])
    with pytest.raises(ValueError, match="lower bounds is greater"):
        lbfgsb.minimize_box(lambda y: (0.0, y), np.zeros(2), np.ones(2), np.zeros(2))


def test_xdiag_is_exact_on_low_rank_and_beats_hutchinson_on_a_decaying_spectrum(tmp_path: Path) -> None:
    """Issue 29 item 2: XDiag (Epperly, Tropp & Webber 2024) is exact to rounding for an operator of rank below its
    sketch size; on a spectrum that decays geometrically its error at 40 products is far below Hutchinson's, and its
    standard errors cover the truth at about the stated rate; the metric takes it with ``--diag-method xdiag``."""
    from minima.files import results
    from minima.sharpness import main as sharpness_main

    rng = np.random.default_rng(0)
    u = rng.standard_normal((120, 10))
    low = torch.from_numpy(u @ np.diag(rng.uniform(1, 5, 10)) @ u.T)
    exact = xdiag_diagonal(CountingOperator(120, lambda v: low @ v), products=24)
    np.testing.assert_allclose(exact.diagonal, np.diag(low.numpy()), rtol=0, atol=1e-10)
    assert exact.hvps == 24
    q, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    h = torch.from_numpy(q @ np.diag(100.0 * 0.8 ** np.arange(120)) @ q.T)
    truth = np.diag(h.numpy())
    x = xdiag_diagonal(CountingOperator(120, lambda v: h @ v), products=40, seed=1)
    hu = hessian_diagonal(CountingOperator(120, lambda v: h @ v), probes=40, seed=1)
    err = {k: np.linalg.norm(r.diagonal - truth) / np.linalg.norm(truth) for k, r in (("x", x), ("h", hu))}
    assert err["x"] < 0.2 * err["h"], err
    assert np.mean(np.abs(x.diagonal - truth) <= 2 * x.stderr) >= 0.85
    with pytest.raises(ValueError, match="even number of products"):
        xdiag_diagonal(CountingOperator(120, lambda v: h @ v), products=41)
    ds = toy_dataset()
    path = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    out = tmp_path / "x.h5"
    assert sharpness_main([str(path), "--metrics", "diagonal", "--diag-method", "xdiag", "--diag-probes", "20",
                           "--out", str(out)]) == 0
    (row,) = results.load_sharpness(out)
    assert row["metric"] == "diagonal_xdiag20" and row["hvps"] == 20 and len(row["diagonal"]) == 315
    assert sharpness_main([str(path), "--metrics", "diagonal", "--diag-method", "xdiag", "--diag-probes", "21",
                           "--out", str(tmp_path / "y.h5")]) == 2
