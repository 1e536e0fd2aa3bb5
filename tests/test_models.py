from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from minima import models
from minima.models import zoo


@pytest.mark.parametrize(
    ("name", "kwargs", "count"),
    [
        ("c1", {}, 1_757_834),
        ("c2", {}, 14_991_946),
        ("vgg11_bn", {"width": 4096}, 28_149_514),
        ("mlp", {"input_shape": (3, 4, 4), "widths": (8,)}, 48 * 8 + 8 + 8 * 10 + 10),
    ],
)
def test_parameter_counts_and_logit_shapes(name: str, kwargs: dict, count: int) -> None:
    model = models.build_model(name, **kwargs).eval()
    assert models.count_parameters(model) == count
    shape = kwargs.get("input_shape", (3, 32, 32))
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    # logits, not log-probabilities: rows of log_softmax output would log-sum-exp to exactly 0
    assert not torch.allclose(torch.logsumexp(out, dim=1), torch.zeros(2), atol=1e-3)


def test_vgg_default_width_and_num_classes() -> None:
    model = models.build_model("vgg11_bn", num_classes=7).eval()
    assert model.classifier[-1].out_features == 7 and model.classifier[2].out_features == 512
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_c1_pooling_is_keras_same_padding() -> None:
    # Keras 'same' 3x3/2 pooling on 32 pixels pads 0 before and 1 after: output pixel 0 covers rows 0..2.
    pool = zoo._keras_same_maxpool_3x3_s2()
    x = torch.zeros(1, 1, 32, 32)
    x[0, 0, 31, 31] = 5.0  # only reachable by the last window thanks to the trailing pad
    x[0, 0, 0, 0] = 3.0
    out = pool(x)
    assert out.shape == (1, 1, 16, 16)
    assert out[0, 0, 15, 15] == 5.0 and out[0, 0, 0, 0] == 3.0 and out[0, 0, 0, 1] == 0.0


def test_build_model_errors_list_choices() -> None:
    choices = (r"\['c1', 'c2', 'c3', 'c4', 'fc_tanh', 'mlp', 'mobilenet_v2', 'nin', 'vgg11', 'vgg11_bn', "
               r"'wide_resnet', 'wrn16_8'\]")
    with pytest.raises(ValueError, match=rf"unknown model 'resnet'.*{choices}.*torchvision:NAME"):
        models.build_model("resnet")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['depth'\].*valid arguments"):
        models.build_model("mlp", depth=3)


def test_has_batchnorm() -> None:
    assert models.has_batchnorm(models.build_model("c1"))
    assert not models.has_batchnorm(models.build_model("mlp", input_shape=(1, 2, 2), widths=(3,)))
    assert models.has_batchnorm(models.build_model("mlp", input_shape=(1, 2, 2), widths=(3,), batchnorm=True))


def test_mobilenet_v2_for_cifar_and_pretrained_loading(tmp_path) -> None:
    model = models.build_model("mobilenet_v2").eval()
    assert model.features[0][0].stride == (1, 1)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # an ImageNet-shaped state dict (1000 classes) loads everywhere but the classifier
    imagenet = models.build_model("mobilenet_v2", num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "w.pth")
    skipped = models.load_imagenet_weights(model, str(tmp_path / "w.pth"))
    assert skipped == ["classifier.1.bias", "classifier.1.weight"]
    assert torch.equal(model.features[3].conv[0][0].weight, imagenet["features.3.conv.0.0.weight"])


def test_imagenet_download_failure_names_the_offline_fix(monkeypatch) -> None:
    import urllib.error

    from torchvision.models import MobileNet_V2_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(MobileNet_V2_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(ConnectionError, match="--pretrained /path/to/"):
        models.load_imagenet_weights(models.build_model("mobilenet_v2"), "imagenet")


@pytest.mark.parametrize("name", ["c1", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_pool_before_relu_is_the_same_function_gradient_and_keys(name: str) -> None:
    torch.manual_seed(0)
    ours = models.build_model(name).double().eval()
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in ours.features) > 0
    textbook = models.textbook_order(models.build_model(name).double().eval())
    def adjacent(model: torch.nn.Module) -> set[tuple[str, str]]:
        kinds = [type(m).__name__ for m in model.features]
        return set(pairwise(kinds))

    assert ("MaxPool2d", "ReLU") in adjacent(ours) and ("ReLU", "MaxPool2d") not in adjacent(ours)
    assert ("ReLU", "MaxPool2d") in adjacent(textbook)
    assert list(textbook.state_dict()) == list(ours.state_dict())  # checkpoints load either way
    textbook.load_state_dict(ours.state_dict())
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 4, 9])
    outs, grads = [], []
    for m in (ours, textbook):
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # max and ReLU commute exactly
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fc_tanh_is_cohen_et_al_s_network() -> None:
    model = models.build_model("fc_tanh")
    assert models.count_parameters(model) == 656_810
    assert [type(m).__name__ for m in model.net] == ["Flatten", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'"):
        models.build_model("mlp", activation="sigmoid")



@pytest.mark.parametrize(("depth", "width"), [(2, 8), (3, 2), (4, 1)])
def test_nin_is_dziugaites_network(depth: int, width: int) -> None:
    """Issue 26: the NiN of the generalisation studies — its parameter count in closed form (c = 25·width channels:
    a first block 3·9·c + c + 2(c² + c) + 3·2c, every further block 9c² + c + 2(c² + c) + 3·2c, the head
    10c + 10 + 2·10), spatial size halved per block, logits ≥ 0 (its head ends in ReLU before the pooling),
    BatchNorm after every convolution."""
    c = 25 * width
    first = 3 * 9 * c + c + 2 * (c * c + c) + 3 * 2 * c
    later = 9 * c * c + c + 2 * (c * c + c) + 3 * 2 * c
    model = models.build_model("nin", depth=depth, width=width).eval()
    assert models.count_parameters(model) == first + (depth - 1) * later + 10 * c + 10 + 2 * 10
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 3 * depth + 1
    assert [m.stride[0] for m in convs] == [2, 1, 1] * depth + [1]
    with torch.no_grad():
        features = model.blocks(torch.randn(2, 3, 32, 32))
        out = model(torch.randn(2, 3, 32, 32))
    assert features.shape[-1] == -(-32 // 2 ** depth) and out.shape == (2, 10) and bool((out >= 0).all())
