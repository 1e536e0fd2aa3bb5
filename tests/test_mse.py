"""The square loss of Cohen et al. (``--loss mse``): its value, gradient, Hessian and Gauss–Newton matrix against
dense float64 references, and every analysis of an MSE run using it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from minima import data
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.evaluate import Batching, evaluate, per_sample_loss
from minima.interpolate import SweepRequest
from minima.interpolate import run as run_line
from minima.models import build_model
from minima.sharpness import main as sharpness_main
from minima.studies.train import TrainConfig, train

from .helpers import logits_of_flat


def _setup(widths: list[int]) -> tuple[torch.nn.Module, data.Dataset, DatasetObjective]:
    torch.manual_seed(0)
    ds = data.synthetic(n_train=40, n_test=8, image_shape=(1, 3, 3), num_classes=3, seed=4)
    model = build_model("mlp", 3, input_shape=[1, 3, 3], widths=widths, activation="tanh").double().eval()
    feed = Batching(16, dtype=torch.float64)
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std, feed), loss="mse")
    return model, ds, obj


def _dense_mse(model: torch.nn.Module, ds: data.Dataset) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64)
    logits_of, theta = logits_of_flat(model, x)
    target = torch.nn.functional.one_hot(ds.train.labels, 3).double()

    def f(th: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((logits_of(th) - target) ** 2).sum(dim=1).mean()

    return f, theta


def test_mse_value_gradient_hessian_and_gauss_newton_against_dense_references() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    assert float(per_sample_loss(logits, torch.tensor([2]), "mse")[0]) == pytest.approx(0.5 * (1 + 4 + 0.25))
    model, ds, obj = _setup([4])
    f, theta = _dense_mse(model, ds)
    value, grad = obj.value_and_grad(theta)
    assert value == pytest.approx(float(f(theta)), rel=1e-12)
    torch.testing.assert_close(grad, torch.autograd.functional.jacobian(f, theta), rtol=1e-10, atol=1e-12)
    dense = torch.autograd.functional.hessian(f, theta)
    v = torch.randn(obj.numel, dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    # a linear model: the Hessian of the square loss is exactly the Gauss–Newton matrix JᵀJ/N
    linear, ds2, lin = _setup([])
    f2, theta2 = _dense_mse(linear, ds2)
    h2 = torch.autograd.functional.hessian(f2, theta2)
    eye = torch.eye(lin.numel, dtype=torch.float64)
    torch.testing.assert_close(torch.stack([lin.ggn_vp(eye[i]) for i in range(lin.numel)]), h2, rtol=1e-10,
                               atol=1e-12)
    result = evaluate(model, ds.train, ds.mean, ds.std, Batching(16, dtype=torch.float64), loss="mse")
    assert result.loss == pytest.approx(float(f(theta)), rel=1e-12)


def test_an_mse_run_is_analysed_with_its_loss(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = data.synthetic(n_train=64, n_test=32, image_shape=(3, 4, 4), num_classes=3, seed=5)
    paths = []
    for seed in (0, 1):
        cfg = TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 4, 4], "widths": [6]}, data="synthetic",
                          epochs=2, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.0, loss="mse", seed=seed,
                          out=str(tmp_path / f"r{seed}"), progress=False)
        paths.append(train(cfg, dataset=ds))
    meta = ck.load_checkpoint(paths[0])["meta"]
    assert meta["train_config"]["loss"] == "mse"
    out = run_line(SweepRequest(checkpoint_a=paths[0], checkpoint_b=paths[1], alphas="0,1", out=tmp_path / "l.h5",
                                device="cpu", plot=False, progress=False))
    curve = results.load_curve(out)
    model = ck.model_from_checkpoint(ck.load_checkpoint(paths[0]))
    ref = evaluate(model, ds.test, ds.mean, ds.std, loss="mse")
    assert curve.test_loss[0] == pytest.approx(ref.loss, rel=1e-6) and curve.attrs["loss"] == "mse"
    assert sharpness_main([str(paths[0]), "--metrics", "hessian", "--topk", "1",
                           "--out", str(tmp_path / "s.h5")]) == 0
    (row,) = results.load_sharpness(tmp_path / "s.h5")
    assert row["loss"] == "mse"
