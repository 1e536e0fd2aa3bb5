"""The networks of Keskar et al. (2017) for CIFAR-10, VGG11-BN, and a toy MLP.

Every model maps a normalised float batch (N, C, H, W) to **logits** (N, num_classes) — never
log-probabilities; the loss is applied outside (``minima.geometry.evaluate``). Constructors have no device or
dtype side effects; they are built through :func:`minima.models.registry.build_model`.

BatchNorm uses Keras' epsilon 1e-3 in ``c1``/``c2`` (the reference code is Keras 1) and PyTorch's
default momentum 0.1 for the running averages (Keras' 0.99 ≙ PyTorch 0.01 would need far more steps to
settle at batch 5000; the interpolation tools re-estimate running statistics anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

KERAS_BN_EPS = 1e-3


def _conv_bn_relu(cin: int, cout: int, kernel: int, eps: float) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout, eps=eps), nn.ReLU(True)]


def _append_pool(layers: list[nn.Module], pool: nn.Module) -> None:
    """Append ``pool`` after ``layers``; if they end in a ReLU, put the pool *before* it.

    max-pool(ReLU(z)) = ReLU(max-pool(z)) exactly (ReLU is monotone, so it commutes with max), with the same
    gradient and Hessian (both pick the window's maximum if it is positive, else nothing); the ReLU and its
    backward then touch a quarter of the elements (``docs/benchmarks.md`` has the gain). Parameter-free swap: the
    state_dict keys (module indices of the convolutions and BatchNorms) are unchanged.
    """
    if layers and isinstance(layers[-1], nn.ReLU):
        layers.insert(len(layers) - 1, pool)
    else:
        layers.append(pool)


def textbook_order(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) with every max-pool → ReLU pair of its ``features`` swapped back to the
    papers' ReLU → max-pool: the same function, as the public scripts compute it (baselines, tests)."""
    layers = list(model.features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    model.features = nn.Sequential(*layers)
    return model


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _keras_same_maxpool_3x3_s2() -> nn.MaxPool2d:
    """Keras ``MaxPooling2D((3, 3), strides=(2, 2), padding='same')``.

    Keras pads 0 before and 1 after with −inf; ``ceil_mode=True`` without padding takes exactly the same
    windows (the last one simply stops at the border), so no padded copy of the activations is made.
    """
    return nn.MaxPool2d(3, 2, ceil_mode=True)


class C1(nn.Module):
    """Keskar's C1 ("shallownet"): 2 × [conv64 5×5 → BN → ReLU → maxpool 3×3/2 'same'] (computed as
    maxpool → ReLU, the same function: see ``_append_pool``), then
    FC384 → BN → ReLU → Dropout(.5) → FC192 → BN → ReLU → Dropout(.5) → FC10. 1,757,834 parameters
    at 32×32×3 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers = _conv_bn_relu(in_channels, 64, 5, KERAS_BN_EPS)
        _append_pool(layers, _keras_same_maxpool_3x3_s2())
        layers += _conv_bn_relu(64, 64, 5, KERAS_BN_EPS)
        _append_pool(layers, _keras_same_maxpool_3x3_s2())
        self.features = nn.Sequential(*layers)
        side = _ceil_div(_ceil_div(image_size, 2), 2)  # two 'same' stride-2 pools
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 384), nn.BatchNorm1d(384, eps=KERAS_BN_EPS), nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(384, 192), nn.BatchNorm1d(192, eps=KERAS_BN_EPS), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(192, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of images."""
        return self.classifier(self.features(x))


C2_PLAN: tuple[tuple[int, ...], ...] = (
    (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512),
)


class C2(nn.Module):
    """Keskar's C2 ("deepnet", the VGG-style CIFAR net): 13 conv3×3 → BN → ReLU in five blocks
    [64,64 | 128,128 | 256×3 | 512×3 | 512×3], each block ending in maxpool 2×2/2; dropout 0.3 after the
    first conv, 0.4 after every other conv except the last of each block; head Flatten → Dropout(.5) →
    FC512 → BN → ReLU → Dropout(.5) → FC10. 14,991,946 parameters at 32×32×3 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, first = in_channels, True
        for block in C2_PLAN:
            for j, cout in enumerate(block):
                layers += _conv_bn_relu(cin, cout, 3, KERAS_BN_EPS)
                if j < len(block) - 1:
                    layers.append(nn.Dropout(0.3 if first else 0.4))
                first, cin = False, cout
            _append_pool(layers, nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(C2_PLAN)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5),
            nn.Linear(512 * side * side, 512), nn.BatchNorm1d(512, eps=KERAS_BN_EPS), nn.ReLU(True),
            nn.Dropout(0.5), nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of images."""
        return self.classifier(self.features(x))


VGG11_PLAN: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    """VGG configuration A with BatchNorm for 32×32 inputs (five pools → 1×1×512), classifier
    Dropout → 512→W → ReLU → Dropout → W→W → ReLU → W→classes. ``width=512`` is the common CIFAR
    variant; ``width=4096`` reproduces Keskar's PyTorch script (28,149,514 parameters). ``batchnorm=False``: the
    plain VGG11 of the connectivity papers (REPAIR's CIFAR-10 VGG11)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 512,
                 dropout: float = 0.5, batchnorm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in VGG11_PLAN:
            if item == "M":
                _append_pool(layers, nn.MaxPool2d(2, 2))
            elif batchnorm:
                layers += _conv_bn_relu(cin, int(item), 3, 1e-5)
                cin = int(item)
            else:
                layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.ReLU(True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(512, width), nn.ReLU(True),
            nn.Dropout(dropout), nn.Linear(width, width), nn.ReLU(True), nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of images."""
        return self.classifier(self.features(x))


def vgg11(num_classes: int = 10, in_channels: int = 3, width: int = 512, dropout: float = 0.5) -> VGG11BN:
    """VGG configuration A without BatchNorm (conv → ReLU), otherwise :class:`VGG11BN`."""
    return VGG11BN(num_classes, in_channels, width, dropout, batchnorm=False)


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flatten → [Linear → (BatchNorm1d) → activation → (Dropout)] per hidden width → Linear to logits. The toy model
    of the tests, and a BN-MLP that shows the sharp/flat effect quickly on CIFAR-10. ``activation``: relu or tanh."""

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32),
                 widths: Sequence[int] = (512, 512), batchnorm: bool = False, dropout: float = 0.0,
                 activation: str = "relu") -> None:
        super().__init__()
        fan_in = 1
        for s in input_shape:
            fan_in *= int(s)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = [nn.Flatten()]
        for w in widths:
            layers.append(nn.Linear(fan_in, int(w)))
            if batchnorm:
                layers.append(nn.BatchNorm1d(int(w)))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = int(w)
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of images."""
        return self.net(x)


def fc_tanh(num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32)) -> MLP:
    """Cohen et al. (2021)'s fully connected tanh network: 3072-200-200-10 with biases, PyTorch's default
    initialisation, no BatchNorm (656,810 parameters at 3×32×32)."""
    return MLP(num_classes, input_shape, widths=(200, 200), activation="tanh")


class _WideBasic(nn.Module):
    """Pre-activation residual unit: BN → ReLU → conv3×3 (stride) → BN → ReLU → dropout → conv3×3, added to the input
    or, when the shape changes, to a 1×1 convolution of the pre-activated input (the first unit of a group)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016) for 32×32 inputs: conv3×3 to 16 channels, three groups of (d − 4)/6
    pre-activation units with 16k, 32k, 64k channels (strides 1, 2, 2), BN → ReLU → 8×8 average pool → linear. The
    initialisation of davda54/sam's WideResNet (SAM's reference recipe): Kaiming-normal convolutions (fan-in, ReLU),
    BatchNorm scale 1 and shift 0, a zero linear layer. WRN-16-8: 10,961,370 parameters at 10 classes.

    ``units`` overrides the units per group: davda54/sam's ``WideResNet(16, 8, …)`` — the network its published
    SGD/SAM/ASAM errors were measured with — builds a downsampling unit plus (d − 4)/6 more per group, 3 for d = 16
    (17,158,106 parameters; ``units=3`` builds it, parameter for parameter)."""

    def __init__(self, num_classes: int = 10, depth: int = 16, width: int = 8, dropout: float = 0.0,
                 in_channels: int = 3, units: int | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, …); got {depth}")
        units = (depth - 4) // 6 if units is None else units
        if units < 1:
            raise ValueError(f"WideResNet units per group must be ≥ 1; got {units}")
        channels = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        for g, stride in enumerate((1, 2, 2)):
            for u in range(units):
                layers.append(_WideBasic(channels[g] if u == 0 else channels[g + 1], channels[g + 1],
                                         stride if u == 0 else 1, dropout))
        layers += [nn.BatchNorm2d(channels[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of images."""
        return self.classifier(self.features(x))


def wrn16_8(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8, the network of SAM's and ASAM's CIFAR-10 comparisons in davda54/sam."""
    return WideResNet(num_classes, depth=16, width=8, dropout=dropout)


def _nin_block(inplanes: int, planes: int) -> nn.Sequential:
    """One NiN block: conv 3×3 stride 2 → BN → ReLU → conv 1×1 → BN → ReLU → conv 1×1 → BN → ReLU (biases kept)."""
    layers: list[nn.Module] = []
    for k, (cin, kernel, stride) in enumerate(((inplanes, 3, 2), (planes, 1, 1), (planes, 1, 1))):
        layers += [nn.Conv2d(cin, planes, kernel, stride=stride, padding=1 if k == 0 else 0), nn.BatchNorm2d(planes),
                   nn.ReLU()]
    return nn.Sequential(*layers)


class NiN(nn.Module):
    """The Network-in-Network CNN of Jiang et al. (2020) and Dziugaite et al. (2020)'s generalisation studies:
    ``depth`` blocks (a strided 3×3 convolution, then two 1×1, each with BatchNorm and ReLU) of
    ``base_width × width`` channels, then a 1×1 convolution to the classes → BatchNorm → ReLU → global average pool.
    As in nitarshan/robust-generalization-measures the logits pass a ReLU (they are ≥ 0); 25 × 8 channels and depth
    2 are its defaults."""

    def __init__(self, num_classes: int = 10, depth: int = 2, width: int = 8, base_width: int = 25,
                 in_channels: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1 or base_width < 1:
            raise ValueError(f"NiN needs depth, width and base_width ≥ 1; got {depth}, {width}, {base_width}")
        channels = base_width * width
        self.blocks = nn.Sequential(*(_nin_block(in_channels if i == 0 else channels, channels) for i in range(depth)))
        self.head = nn.Sequential(nn.Conv2d(channels, num_classes, 1), nn.BatchNorm2d(num_classes), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (non-negative: the head ends in a ReLU before the pooling) of a batch of images."""
        return self.head(self.blocks(x))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2 of torchvision adapted to 32×32 inputs: the stem convolution has stride 1 instead of 2
    (otherwise a CIFAR image is 1×1 after the fourth stage). Parameter names and shapes are torchvision's,
    so ImageNet weights load into every layer but the classifier (see :func:`load_imagenet_weights`)."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
    model.features[0][0].stride = (1, 1)
    return model


def load_imagenet_weights(model: nn.Module, source: str) -> list[str]:
    """Load ImageNet MobileNetV2 weights into ``model`` except the classifier; return the skipped keys.

    ``source`` is a local ``.pth`` state dict (loaded with ``weights_only=True``) or ``"imagenet"`` for
    torchvision's weights API, which downloads on first use; offline, the error says to pass a local file.
    """
    if source == "imagenet":
        from torchvision.models import MobileNet_V2_Weights

        try:
            state = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise ConnectionError(
                f"could not download ImageNet MobileNetV2 weights ({exc}); on an offline machine pass "
                "--pretrained /path/to/mobilenet_v2-b0353104.pth (a torchvision state dict)") from exc
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{source} holds no MobileNetV2 weights matching this model")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


