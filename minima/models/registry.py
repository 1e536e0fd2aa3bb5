"""The model registry and the one way every model is built: a registry name, ``torchvision:NAME`` or a user's
``package.module:factory`` (imported only when trusted, :mod:`minima.models.trust`).

``build_model(name, num_classes, **kwargs)`` is the only entry point the rest of the toolkit uses, so a checkpoint
can rebuild its model from the stored ``name`` and ``kwargs``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from minima.models.trust import ModelSpecError, check_trusted
from minima.models.zoo import C1, C2, MLP, VGG11BN, NiN, WideResNet, fc_tanh, mobilenet_v2, vgg11, wrn16_8

UNSET: Any = object()  # "num_classes not passed": the model arguments' own num_classes, else 10


@dataclass(frozen=True)
class ModelInfo:
    r"""A registry entry: how to build the model and what it expects.

    ``factory(num_classes=..., **kwargs)`` returns an ``nn.Module`` mapping (N, \*input_shape) float batches to
    (N, num_classes) logits; ``input_shape`` and ``num_classes`` are the defaults; ``convolutional`` decides the
    memory format (channels_last) and the convolution-specific derivatives (one source of truth); ``data`` is the
    data set the model is meant for when none is given (``--data`` syntax; None: CIFAR-10's default resolution)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    convolutional: bool
    summary: str
    data: str | None = None


REGISTRY: dict[str, ModelInfo] = {info.name: info for info in (
    ModelInfo("c1", C1, (3, 32, 32), 10, True, "Keskar's C1 shallow conv net (1,757,834 parameters)"),
    ModelInfo("c2", C2, (3, 32, 32), 10, True, "Keskar's C2 VGG-style conv net (14,991,946 parameters)"),
    ModelInfo("c3", C1, (3, 32, 32), 100, True, "Keskar's C3: C1's design for CIFAR-100 (1,775,204 parameters)",
              data="torchvision:CIFAR100"),
    ModelInfo("c4", C2, (3, 32, 32), 100, True, "Keskar's C4: C2's design for CIFAR-100 (15,038,116 parameters)",
              data="torchvision:CIFAR100"),
    ModelInfo("vgg11_bn", VGG11BN, (3, 32, 32), 10, True, "VGG-A with BatchNorm for 32×32 inputs"),
    ModelInfo("vgg11", vgg11, (3, 32, 32), 10, True, "VGG-A without BatchNorm (REPAIR's CIFAR-10 VGG11)"),
    ModelInfo("mlp", MLP, (3, 32, 32), 10, False, "fully connected net, optional BatchNorm and dropout"),
    ModelInfo("fc_tanh", fc_tanh, (3, 32, 32), 10, False, "Cohen et al.'s edge-of-stability network: 3072-200-200-10, "
              "tanh (656,810 parameters)"),
    ModelInfo("wrn16_8", wrn16_8, (3, 32, 32), 10, True, "WideResNet-16-8, pre-activation, davda54/sam's "
              "initialisation (10,961,370 parameters)"),
    ModelInfo("wide_resnet", WideResNet, (3, 32, 32), 10, True, "WideResNet-d-k (depth = 6n + 4, width k)"),
    ModelInfo("mobilenet_v2", mobilenet_v2, (3, 32, 32), 10, True, "torchvision MobileNetV2, stride-1 stem"),
    ModelInfo("nin", NiN, (3, 32, 32), 10, True, "Network-in-Network of Jiang et al.'s and Dziugaite et al.'s "
              "generalisation studies (depth blocks of 25 × width channels; depth 2, width 8: 531,030 parameters)"),
)}
TORCHVISION_PREFIX = "torchvision:"


def available_models() -> list[str]:
    """Names accepted by :func:`build_model` besides ``torchvision:NAME`` and ``package.module:factory``."""
    return sorted(REGISTRY)


def model_kind(name: str) -> str:
    """``registry``, ``torchvision`` (``torchvision:NAME``) or ``import`` (``package.module:factory``)."""
    if name.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    return "import" if ":" in name else "registry"


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; ``ValueError`` listing the choices for an unknown name."""
    if name not in REGISTRY:
        raise ModelSpecError(f"unknown model {name!r}; choose one of {available_models()}, torchvision:NAME (e.g. "
                             "torchvision:resnet18) or an import path package.module:factory")
    return REGISTRY[name]


def is_convolutional(model: str | nn.Module) -> bool:
    """Whether a model (a registry name, or a module) is convolutional: the registry's answer for a registered
    name or class, otherwise whether the module contains a 2-D convolution."""
    if isinstance(model, str):
        return model_info(model).convolutional
    for info in REGISTRY.values():
        if isinstance(info.factory, type) and type(model) is info.factory:
            return info.convolutional
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(name: str, num_classes: int | object | None = UNSET, /, *, trusted: Iterable[str] = (),
                **kwargs: object) -> nn.Module:
    """Construct the model ``name`` with ``num_classes`` outputs (None: the arguments decide; a ``num_classes`` in
    ``kwargs`` as well must equal it, see :func:`resolve_model`).

    * a registry name (:func:`available_models`);
    * ``torchvision:NAME`` — a torchvision classification model, ``torchvision.models.get_model(NAME, weights=None,
      num_classes=..., **kwargs)``;
    * ``package.module:factory`` — ``factory(**kwargs)`` from an importable module, imported only when the module is
      in ``trusted`` or ``$MINIMA_TRUSTED_IMPORTS`` (:class:`UntrustedImportError` otherwise); ``num_classes`` is
      passed when the factory takes it and ``kwargs`` does not set it.

    Raises :class:`ModelSpecError` naming the valid choices or the fix for every other problem."""
    factory, arguments = resolve_model(name, num_classes, trusted=trusted, **kwargs)  # type: ignore[arg-type]
    return instantiate(name, factory, arguments)


def instantiate(name: str, factory: Callable[..., Any], arguments: dict[str, Any]) -> nn.Module:
    """``factory(**arguments)`` as :func:`resolve_model` returned them, checked to be an ``nn.Module``."""
    try:
        model = factory(**arguments)
    except TypeError as exc:
        raise ModelSpecError(f"{name}(**{arguments}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def default_data(name: str) -> str | None:
    """The data set a model is meant for when none is given (``--data`` syntax): a registry entry's ``data`` (c3/c4:
    CIFAR-100), else None (CIFAR-10's default resolution)."""
    return model_info(name).data if model_kind(name) == "registry" else None


def resolve_model(name: str, num_classes: int | object | None = UNSET, /, *, trusted: Iterable[str] = (),
                  **kwargs: object) -> tuple[Callable[..., Any], dict[str, Any]]:
    """(factory, the exact keyword arguments it will be called with) for :func:`build_model` — what a checkpoint
    stores so that the same call rebuilds the model. A ``num_classes`` in ``kwargs`` (e.g. ``--model-kwargs
    '{"num_classes": 10}'``) is accepted when it equals ``num_classes`` (the data's class count) and refused in one
    line naming both otherwise."""
    kind = model_kind(name)
    stated = kwargs.pop("num_classes", UNSET)
    if num_classes is UNSET:  # only the keyword (or nothing: 10 classes)
        num_classes = 10 if stated is UNSET else stated
    elif stated is not UNSET:  # both: the data's count (positional) and the model arguments' own
        if num_classes is not None and stated != num_classes:
            raise ModelSpecError(f"the model arguments set num_classes={stated!r} but the data has {num_classes} "
                                 "classes; drop num_classes from the model arguments (minima sets it from the data) "
                                 "or use data with that many classes")
        num_classes = stated
    if kind == "registry":
        ctor = model_info(name).factory
        params = inspect.signature(ctor).parameters
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            valid = sorted(p for p in params if p != "num_classes")
            raise ModelSpecError(f"model {name!r} got unknown argument(s) {unknown}; valid arguments: {valid}")
        return ctor, (dict(kwargs) if num_classes is None else dict(kwargs, num_classes=num_classes))
    if kind == "torchvision":
        import torchvision.models as tvm

        arch = name[len(TORCHVISION_PREFIX):]
        valid = tvm.list_models(module=tvm)
        if arch not in valid:
            near = [m for m in valid if m.startswith(arch[:4])][:8]
            raise ModelSpecError(f"torchvision has no classification model {arch!r}"
                                 + (f"; similar: {near}" if near else "") + " (torchvision.models.list_models())")
        if num_classes is not None:
            kwargs = dict(kwargs, num_classes=num_classes)
        return (lambda **kw: tvm.get_model(arch, weights=None, **kw)), dict(kwargs)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model import path {name!r} must be package.module:factory")
    check_trusted(name, module_name, trusted)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import {module_name!r} for the model {name!r} ({exc}); is it installed or on "
                             "PYTHONPATH?") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"{name!r}: {module_name} has no callable {attr!r} (got {type(factory).__name__}); "
                             "point at a function or class that returns an nn.Module")
    if num_classes is not None and _accepts(factory, "num_classes"):
        kwargs = dict(kwargs, num_classes=num_classes)
    return factory, dict(kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalar parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer is present (decides the default BN policy along a path)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
