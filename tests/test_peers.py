"""minima's curvature products and estimators equal curvlinops' (and BackPACK's diagonal GGN) on three small models
in float64 (issue 29 item 7). curvlinops and BackPACK are development dependencies; without them these tests skip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from minima import data
from minima.curvature.hessian import hessian_diagonal, hessian_operator, top_eigenvalues
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.geometry.evaluate import Batching

curvlinops = pytest.importorskip("curvlinops")

TOL = 1e-8


def _models() -> dict[str, tuple[nn.Module, tuple[int, int, int]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 1 * 1, 3))
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so eval mode matters
        conv[1].running_mean.normal_()
        conv[1].running_var.uniform_(0.5, 2.0)
    return {"mlp": (mlp, (3, 2, 2)), "tanh": (tanh, (3, 2, 2)), "conv_bn": (conv, (3, 2, 2))}


@pytest.fixture(params=["mlp", "tanh", "conv_bn"])
def case(request: pytest.FixtureRequest) -> tuple[DatasetObjective, list, int]:
    model, shape = _models()[request.param]
    ds = data.synthetic(n_train=40, n_test=8, image_shape=shape, num_classes=3, seed=1)
    batches = FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(16, dtype=torch.float64))
    obj = DatasetObjective(model.double().eval(), batches, bn="eval")
    return obj, batches.batches, sum(p.numel() for p in obj.params)


def _theirs(kind: str, obj: DatasetObjective, batches: list) -> object:
    op = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator,
          "ef": curvlinops.EFLinearOperator}[kind]
    return op(obj.model, nn.CrossEntropyLoss(reduction="mean"), list(obj.params), batches)


def _matvec(op: object, v: torch.Tensor) -> torch.Tensor:
    out = op @ v
    return torch.cat([o.reshape(-1) for o in out]) if isinstance(out, list | tuple) else out.reshape(-1)


def test_products_equal_curvlinops(case: tuple) -> None:
    obj, batches, n = case
    ops = {kind: _theirs(kind, obj, batches) for kind in ("hessian", "ggn", "ef")}
    torch.manual_seed(1)
    for _ in range(3):
        v = torch.randn(n, dtype=torch.float64)
        for kind, ours in (("hessian", obj.hvp), ("ggn", obj.ggn_vp), ("ef", lambda u: obj.fisher_vp(u))):
            theirs = _matvec(ops[kind], v)
            torch.testing.assert_close(ours(v), theirs, rtol=TOL, atol=TOL * float(theirs.abs().max()))


@pytest.mark.slow  # a dense Hessian column by column from both libraries
def test_diagonal_trace_and_top_eigenvalues_equal_curvlinops(case: tuple) -> None:
    obj, batches, n = case
    op = _theirs("hessian", obj, batches)
    dense = torch.stack([_matvec(op, e) for e in torch.eye(n, dtype=torch.float64)], dim=1)
    exact = hessian_diagonal(hessian_operator(obj), exact_below=n)
    np.testing.assert_allclose(exact.diagonal, torch.diagonal(dense).numpy(), rtol=TOL, atol=TOL)
    assert exact.diagonal.sum() == pytest.approx(float(torch.trace(dense)), rel=TOL, abs=TOL)
    eig = np.linalg.eigvalsh(((dense + dense.T) / 2).numpy())
    top = top_eigenvalues(hessian_operator(obj), k=2, tol=1e-12, max_steps=n)
    np.testing.assert_allclose(top.eigenvalues, eig[::-1][:2], rtol=TOL)
    low = top_eigenvalues(hessian_operator(obj), k=1, tol=1e-12, max_steps=n, which="smallest")
    np.testing.assert_allclose(low.eigenvalues, eig[:1], rtol=1e-6, atol=TOL * abs(eig).max())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's hooks on input layers
def test_diagonal_ggn_equals_backpack(case: tuple) -> None:
    """BackPACK's exact diagonal of the GGN (DiagGGNExact) where it applies: sequences of its supported layers."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    from minima.curvature.hessian import ggn_operator

    obj, batches, n = case
    model = backpack.extend(copy.deepcopy(obj.model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        model.zero_grad()
        with backpack.backpack(DiagGGNExact()):
            loss_fn(model(x), y).backward()
        total = [t + p.diag_ggn_exact for t, p in zip(total, model.parameters(), strict=True)]
    theirs = torch.cat([t.reshape(-1) for t in total]).numpy() / obj.count
    ours = hessian_diagonal(ggn_operator(obj), exact_below=n).diagonal
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL * abs(theirs).max())
