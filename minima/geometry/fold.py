"""Fold eval-mode BatchNorm into the preceding convolution or linear layer.

In eval mode BN is the affine map y = s·x + t with s = γ/sqrt(σ² + ε), t = β − μ·s (fixed μ, σ²), so
``Conv → BN`` equals one convolution with weights s·W and bias s·b + t (per output channel). Two uses:

* :func:`fold_batchnorm` — a frozen, folded copy for evaluation: one pass over every activation map fewer;
  results agree with the unfolded network to float rounding (≈1e-6 relative in float32).
* :func:`folded_in_weights` — the same identity applied *differentiably* on the live parameters: the scale
  multiplies the (small) weight tensor instead of the (large) activation, so f, ∇f and Hessian-vector products
  with respect to W, b, γ and β are unchanged while the activation-sized BatchNorm work disappears from the
  forward pass, the backward pass and the double backward.

Only adjacent pairs inside ``nn.Sequential`` containers are folded (the layout of every model in
:mod:`minima.models`); anything else is left as is.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

BatchNorm = nn.modules.batchnorm._BatchNorm


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, BatchNorm) or bn.running_mean is None:
        return False
    return (isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or (
        isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d))


def foldable_pairs(module: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """``(container, layer name, bn name)`` for every adjacent Conv2d→BatchNorm2d or Linear→BatchNorm1d pair
    (with running statistics) inside an ``nn.Sequential`` anywhere in ``module``."""
    pairs = []
    for container in module.modules():
        if isinstance(container, nn.Sequential):
            for first, second in pairwise(list(container._modules)):
                layer, bn = container._modules[first], container._modules[second]
                if layer is not None and bn is not None and _foldable(layer, bn):
                    pairs.append((container, first, second))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable Conv/Linear → BatchNorm pair fused (the input
    model is not modified)."""
    folded = copy.deepcopy(model).eval()
    for container, first, second in foldable_pairs(folded):
        layer, bn = container._modules[first], container._modules[second]
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        container._modules[first] = fuse(layer, bn)
        container._modules[second] = nn.Identity()
    return folded


def eval_bn_scale_shift(bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of eval-mode BatchNorm y = s·x + t, differentiable in γ and β: s = γ/sqrt(σ² + ε), t = β − μ·s."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _folded_layer_forward(layer: nn.Conv2d | nn.Linear, bn: BatchNorm) -> types.MethodType:
    def forward(self: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
        scale, shift = eval_bn_scale_shift(bn)
        weight = self.weight * scale.view((-1,) + (1,) * (self.weight.dim() - 1))
        bias = shift if self.bias is None else self.bias * scale + shift
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    return types.MethodType(forward, layer)


def _eval_bn_affine_forward(self: BatchNorm, x: torch.Tensor) -> torch.Tensor:
    # Same function as F.batch_norm(training=False) in elementwise ops, whose second derivative is cheap
    # (PyTorch's generic BatchNorm double backward computes terms that vanish in eval mode).
    scale, shift = eval_bn_scale_shift(self)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


def _identity_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def folded_in_weights(model: nn.Module) -> Iterator[int]:
    """Within the block, every eval-mode BatchNorm of ``model`` is applied through the weights of the layer
    before it (W ← s·W, b ← s·b + t, BN → identity); BatchNorm layers with no foldable predecessor run as the
    explicit affine map. Same function of the same parameters, so autograd gives the same derivatives.
    Yields the number of folded pairs; the original forwards are restored on exit.

    Only for BatchNorm in eval mode (running statistics); the caller must not train inside the block.
    """
    training = [name for name, m in model.named_modules() if isinstance(m, BatchNorm) and m.training]
    if training:
        raise ValueError(f"folded_in_weights needs BatchNorm in eval mode, but {training[:3]} are training; "
                         "call model.eval() first (folding uses the running statistics)")
    patched: list[nn.Module] = []
    folded_bns = set()
    try:
        for container, first, second in foldable_pairs(model):
            layer, bn = container._modules[first], container._modules[second]
            layer.forward = _folded_layer_forward(layer, bn)
            bn.forward = types.MethodType(_identity_forward, bn)
            patched += [layer, bn]
            folded_bns.add(bn)
        for m in model.modules():
            if isinstance(m, BatchNorm) and m.running_var is not None and m not in folded_bns:
                m.forward = types.MethodType(_eval_bn_affine_forward, m)
                patched.append(m)
        yield len(folded_bns)
    finally:
        for m in patched:
            if "forward" in m.__dict__:
                del m.forward  # back to the class's forward
