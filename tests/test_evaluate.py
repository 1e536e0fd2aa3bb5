from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minima import data
from minima.curvature.convgrad import constant_input_convs
from minima.geometry.evaluate import Batching, batch_sums, evaluate, per_sample_cross_entropy, recompute_bn_stats
from minima.geometry.fold import fold_batchnorm, folded_in_weights
from minima.models import build_model


class FixedLogits(nn.Module):
    """Returns prescribed logits for consecutive samples, batch after batch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.pos = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.pos : self.pos + x.shape[0]]
        self.pos += x.shape[0]
        return out


def test_cross_entropy_is_stable_at_huge_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 10, generator=gen) * 1e4).float()
    labels = torch.randint(0, 10, (64,), generator=gen)
    ours = per_sample_cross_entropy(logits, labels)
    ref = torch.logsumexp(logits.double(), 1) - logits.double()[torch.arange(64), labels]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-3)
    naive = -torch.log(torch.softmax(logits, 1))[torch.arange(64), labels]
    assert not torch.isfinite(naive).all()  # the bug this guards against


def test_low_precision_logits_are_upcast_before_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 10, generator=gen, dtype=torch.float64) * 30).to(torch.bfloat16)
    labels = torch.randint(0, 10, (64,), generator=gen)
    want = per_sample_cross_entropy(logits.to(torch.float64), labels).sum()
    got = batch_sums(logits, labels)[0]
    assert abs(float(got - want)) <= 1e-5 * float(want.abs())  # float32 log-softmax of the same logits
    in_bf16 = per_sample_cross_entropy(logits, labels).to(torch.float64).sum()
    assert abs(float(in_bf16 - want)) > abs(float(got - want))  # what a bfloat16 log-softmax would lose


def test_evaluate_exact_sums_and_nonfinite_counting() -> None:
    ds = data.synthetic(n_train=10, n_test=10, image_shape=(1, 1, 1), num_classes=3, seed=0)
    logits = torch.randn(10, 3, dtype=torch.float64)
    logits[3, 0] = float("nan")
    res = evaluate(FixedLogits(logits), ds.test, ds.mean, ds.std, Batching(3, dtype=torch.float64))
    losses = torch.logsumexp(logits, 1) - logits[torch.arange(10), ds.test.labels]
    finite = torch.isfinite(losses)
    assert res.count == 10 and res.nonfinite == 1
    assert res.loss == pytest.approx(float(losses[finite].sum()) / 9, rel=1e-12)
    acc = (logits.argmax(1) == ds.test.labels).double().mean()
    assert res.accuracy == pytest.approx(float(acc))


def test_batch_stat_evaluation_leaves_model_untouched() -> None:
    ds = data.synthetic(n_train=64, n_test=32, image_shape=(3, 4, 4), num_classes=3, seed=1)
    model = build_model("mlp", num_classes=3, input_shape=(3, 4, 4), widths=(5,), batchnorm=True, dropout=0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = evaluate(model, ds.test, ds.mean, ds.std, Batching(16), bn="batch")
    b = evaluate(model, ds.test, ds.mean, ds.std, Batching(16), bn="batch")
    assert a == b  # dropout off, fixed batches: deterministic
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    c = evaluate(model, ds.test, ds.mean, ds.std, Batching(16))
    assert c != a


def test_recompute_bn_with_one_batch_gives_split_statistics() -> None:
    ds = data.synthetic(n_train=50, n_test=10, image_shape=(3, 2, 2), num_classes=3, seed=2)
    model = build_model("mlp", num_classes=3, input_shape=(3, 2, 2), widths=(4,), batchnorm=True).double()
    recompute_bn_stats(model, ds.train, ds.mean, ds.std, Batching(1000, dtype=torch.float64))
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64).flatten(1)
    h = model.net[1](x)
    bn = model.net[2]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, h.var(0, unbiased=True), rtol=1e-12, atol=1e-12)
    assert not model.training and bn.momentum == 0.1


def _float64_model_with_random_bn(name: str, seed: int) -> nn.Module:
    """An eval-mode float64 model whose BatchNorm statistics and affine parameters are far from the identity
    (at initialisation BN would be nearly the identity, and folding it nearly trivial)."""
    torch.manual_seed(seed)
    model = build_model(name).double().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.running_var, 0.5, 2.0)
            nn.init.normal_(m.running_mean)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model


@pytest.mark.parametrize("name", ["c1", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_folding_batchnorm_preserves_eval_outputs(name: str) -> None:
    model = _float64_model_with_random_bn(name, seed=0)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # original intact
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
        assert math.isfinite(float(folded(x).sum()))


@pytest.mark.parametrize("name", ["c1", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_folded_in_weights_keeps_function_gradient_and_hvp(name: str) -> None:
    model = _float64_model_with_random_bn(name, seed=1)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 7, 9])
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]

    def value_grad_hvp() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v, strict=True)), params)
        return loss.detach(), [g.detach() for g in grads], list(hv)

    plain = value_grad_hvp()
    with folded_in_weights(model) as pairs:
        folded = value_grad_hvp()
    # as DatasetObjective builds its HVP graphs: folded BN and weight-only derivatives of the data convolution
    with folded_in_weights(model), constant_input_convs(model):
        weight_only = value_grad_hvp()
    assert pairs == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for result in (folded, weight_only):
        torch.testing.assert_close(result[0], plain[0], rtol=1e-12, atol=0)
        for got, want in zip(result[1] + result[2], plain[1] + plain[2], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert all("forward" not in m.__dict__ and "_conv_forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="eval mode"), folded_in_weights(model.train()):
        pass
