"""Permutation alignment: the traced structure preserves every model's function, matching finds planted
permutations, the weight-matching objective never decreases, and the command's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minima import data
from minima.align import main as align_main
from minima.files import checkpoint as ck
from minima.geometry.evaluate import Batching
from minima.geometry.matching import activation_matching, weight_matching, weight_objective
from minima.geometry.permute import UnpermutableError, permutation_spec, permute_state
from minima.models import build_model
from tests.helpers import SHAPE, TinyResNet, toy_checkpoint, toy_dataset

MODELS = {
    "mlp": lambda: build_model("mlp", 10, widths=[12, 10]),
    "mlp_bn": lambda: build_model("mlp", 10, widths=[12, 10], batchnorm=True),
    "fc_tanh": lambda: build_model("fc_tanh", 10),
    "c1": lambda: build_model("c1", 10),
    "c2": lambda: build_model("c2", 10),
    "c3": lambda: build_model("c3"),
    "c4": lambda: build_model("c4"),
    "vgg11_bn": lambda: build_model("vgg11_bn", 10),
    "vgg11": lambda: build_model("vgg11", 10),
    "mobilenet_v2": lambda: build_model("mobilenet_v2", 10, width_mult=0.25),
    "resnet_factory": lambda: TinyResNet(10, width=6),
}


def _scrambled(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters, so that a wrong permutation of any of them shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


FAST = {"mlp", "mlp_bn", "fc_tanh", "c1", "resnet_factory"}  # the large networks run with the slow tests
CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}",
                      marks=[] if name in FAST else [pytest.mark.slow])
         for name in MODELS for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_permuted_model_computes_the_same_function(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _no_dropout(_scrambled(MODELS[name]())).to(dtype)
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    spec = permutation_spec(model, x[:2])
    assert spec.groups, name
    state = model.state_dict()
    permuted = permute_state(state, spec, spec.random(1))
    # a permutation of the state dict: every tensor holds the same multiset of values, and something moved
    assert all(torch.equal(state[k].flatten().sort().values, permuted[k].flatten().sort().values) for k in state)
    assert any(not torch.equal(state[k], permuted[k]) for k in state)
    other = _no_dropout(MODELS[name]()).to(dtype)
    other.load_state_dict(permuted)
    # float32: the permuted network sums in another order; through C2's wide convolutions and BatchNorm on 4 images
    # the rounding reaches 1.5e-5 of the logits' scale on an AMD EPYC (1e-5 held on the Intel Xeon); float64 is exact
    tol = 5e-5 if dtype == torch.float32 else 1e-12
    for train_mode in (False, True):  # eval: running statistics; train: BatchNorm on the batch's statistics
        model.train(train_mode)
        other.train(train_mode)
        with torch.no_grad():
            ref, got = model(x), other(x)
        scale = max(1.0, float(ref.abs().max()))
        assert float((ref - got).abs().max()) <= tol * scale, (name, train_mode)


@pytest.mark.parametrize("name", ["mlp", "mlp_bn", "c1", "resnet_factory"])
def test_weight_matching_undoes_a_planted_permutation(name: str) -> None:
    torch.manual_seed(0)
    model = _scrambled(MODELS[name]())
    spec = permutation_spec(model, torch.randn(2, 3, 32, 32))
    state_a = model.state_dict()
    state_b = permute_state(state_a, spec, spec.random(3))
    found = weight_matching(state_a, state_b, spec, seed=0)
    aligned = permute_state(state_b, spec, found.perms)
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)
    assert found.objective_after == pytest.approx(weight_objective(state_a, state_a, spec, spec.identity()), rel=1e-12)


@pytest.mark.parametrize("name", ["mlp", "mlp_bn", "resnet_factory", "c1"])
def test_weight_matching_objective_never_decreases(name: str) -> None:
    torch.manual_seed(1)
    a, b = MODELS[name](), MODELS[name]()  # independent initialisations
    spec = permutation_spec(a, torch.randn(2, 3, 32, 32))
    found = weight_matching(a.state_dict(), b.state_dict(), spec, seed=2)
    history = np.asarray(found.history)
    assert len(history) >= 2
    assert (np.diff(history) >= -1e-9 * np.abs(history[:-1])).all(), history
    assert found.objective_after > found.objective_before  # two random networks are never already best matched
    assert found.objective_after == pytest.approx(
        weight_objective(a.state_dict(), b.state_dict(), spec, found.perms), rel=1e-12)


def test_activation_matching_recovers_a_planted_permutation() -> None:
    torch.manual_seed(0)
    ds = data.synthetic(n_train=400, n_test=10, image_shape=(3, 8, 8), num_classes=3, seed=2)
    model_a = build_model("mlp", 3, input_shape=[3, 8, 8], widths=[16, 12])
    spec = permutation_spec(model_a, data.normalize(ds.train.images[:2], ds.mean, ds.std))
    planted = spec.random(5)
    model_b = build_model("mlp", 3, input_shape=[3, 8, 8], widths=[16, 12])
    model_b.load_state_dict(permute_state(model_a.state_dict(), spec, planted))
    found = activation_matching(model_a, model_b, spec, ds.train, ds.mean, ds.std, Batching(128))
    aligned = permute_state(model_b.state_dict(), spec, found.perms)
    assert all(torch.equal(aligned[k], model_a.state_dict()[k]) for k in aligned)
    assert found.objective_after == pytest.approx(1.0, abs=1e-9)
    assert found.objective_before < 0.5


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(48, 4), nn.Linear(48, 4), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class _Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.Softmax(dim=1), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))


@pytest.mark.parametrize(("model", "named"), [(_Concat(), "'cat'"), (_Softmaxed(), "'net.2' (Softmax)"),
                                               (_Branchy(), "torch.fx cannot trace _Branchy")])
def test_unknown_ops_are_refused_by_name(model: nn.Module, named: str) -> None:
    with pytest.raises(UnpermutableError) as err:
        permutation_spec(model, torch.randn(2, *SHAPE))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_align_command_writes_a_checkpoint_with_provenance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 0, ds, batchnorm=True, widths=(6, 5))
    b = toy_checkpoint(tmp_path / "b.pt", 1, ds, batchnorm=True, widths=(6, 5))
    for method in ("weights", "activations"):
        out = tmp_path / f"b_{method}.pt"
        assert align_main([str(a), str(b), "--method", method, "--out", str(out)]) == 0
        aligned = ck.load_checkpoint(out)
        record = aligned["meta"]["alignment"]
        assert record["method"] == method and record["sha256_b"] == ck.sha256_file(b)
        assert record["sha256_a"] == ck.sha256_file(a)
        assert record["objective"]["after"] >= record["objective"]["before"] - 1e-12
        assert sorted(record["permutations"]) == ["P_net.1", "P_net.4"]
        assert record["function_max_abs_diff"] < 1e-5
        model_b = ck.model_from_checkpoint(ck.load_checkpoint(b)).eval()
        model_c = ck.model_from_checkpoint(aligned).eval()
        x = data.normalize(ds.test.images, ds.mean, ds.std)
        with torch.no_grad():
            assert torch.allclose(model_b(x), model_c(x), atol=1e-5, rtol=0)
    # the default output lands beside B, never in the working directory
    assert align_main([str(a), str(b)]) == 0
    assert (tmp_path / "b_aligned_to_a.pt").is_file()
    assert align_main([str(a), str(b)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_align_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 0, ds, widths=(6,))
    b = toy_checkpoint(tmp_path / "b.pt", 1, ds, widths=(7,))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [([str(a), str(b)], "do not share one architecture"),
             ([str(a), str(text)], "not a PyTorch checkpoint"),
             ([str(a), str(a), "--out", str(tmp_path / "x.h5")], "should end in .pt"),
             ([str(a), str(a), "--out", str(a)], "is an input checkpoint"),
             ([str(a), str(a), "--method", "magic"], "invalid choice")]
    for argv, message in cases:
        try:
            status = align_main(argv)
        except SystemExit as exc:  # argparse's own refusal of an unknown choice
            status = exc.code
        err = capsys.readouterr().err
        assert status == 2 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "notes.txt"]
