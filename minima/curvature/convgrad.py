"""2-D convolution of a *constant* input (the images) whose derivatives only ever go to weight and bias.

For y = conv(x, W) + b the backward pass needs ∂L/∂W = corr(x, ∂L/∂y) and ∂L/∂b = Σ_{n,h,w} ∂L/∂y, and
nothing for x when x is data. PyTorch's generic convolution double backward (used for Hessian-vector
products by reverse-over-reverse differentiation) nevertheless evaluates the term that belongs to
∂L/∂x — a transposed convolution of the full activation map, a conv-sized product — even when x
does not require grad. Here the two levels are written out so that only the needed terms exist:

* first level, ``conv(x, W, b)`` with backward g ↦ (∂L/∂W, ∂L/∂b) = (corr(x, g), Σ g);
* second level, that backward as a function of g — linear, so its own backward maps the incoming
  (u_W, u_b) to conv(x, u_W) + u_b, one forward convolution and nothing else.

Same numbers as ``F.conv2d`` (it calls the same kernels); third derivatives through the second level are
not supported (nothing in the toolkit needs them).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _supported(layer: nn.Conv2d) -> bool:
    return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _conv_args(layer: nn.Conv2d) -> tuple[Any, Any, Any, int]:
    if not _supported(layer):
        raise ValueError(f"constant-input convolution supports explicit zero padding only, not {layer.padding!r} "
                         f"with padding_mode={layer.padding_mode!r}")
    return layer.stride, layer.padding, layer.dilation, layer.groups


class _WeightGrad(torch.autograd.Function):
    """(g, x) ↦ (∂L/∂W, ∂L/∂b) of a convolution, differentiable in g only."""

    @staticmethod
    def forward(ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                stride: Any, padding: Any, dilation: Any, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias_sizes = [weight.shape[0]] if has_bias else None
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
            [False, True, has_bias])
        ctx.save_for_backward(x)
        ctx.conv = (stride, padding, dilation, groups)
        return grad_w, grad_b

    @staticmethod
    def backward(ctx: Any, u_w: torch.Tensor, u_b: torch.Tensor | None) -> tuple[Any, ...]:
        # Autograd materialises a direction that was not given as zeros, so u_w is a tensor; u_b is None
        # only for a convolution without bias.
        (x,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_grad_out = F.conv2d(x, u_w, u_b, stride, padding, dilation, groups)
        return grad_grad_out, None, None, None, None, None, None, None


class _ConstantInputConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any,
                padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        grad_w, grad_b = _WeightGrad.apply(grad_out, x, weight.detach(), ctx.has_bias, *ctx.conv)
        return None, grad_w, grad_b, None, None, None, None


def constant_input_conv2d(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s convolution of ``x`` with the given ``weight``/``bias`` (for example BatchNorm-folded ones).

    Uses the weight-only autograd path when x needs no gradient and autograd is recording; otherwise the
    plain ``F.conv2d``. The caller must not ask for ∂/∂x (x.requires_grad is False, so autograd cannot)."""
    stride, padding, dilation, groups = _conv_args(layer)
    if x.requires_grad or not torch.is_grad_enabled():
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _ConstantInputConv.apply(x, weight, bias, stride, padding, dilation, groups)


@contextlib.contextmanager
def constant_input_convs(model: nn.Module) -> Iterator[int]:
    """Within the block every ``nn.Conv2d`` of ``model`` convolves through :func:`constant_input_conv2d`
    (same values; no ∂/∂input work in the backward or double backward when its input is data). Composes with
    :func:`minima.geometry.fold.folded_in_weights`, whose folded forward calls the layer's ``_conv_forward``. For
    reverse-mode autograd only (not ``torch.func`` transforms). Convolutions with string padding or a
    non-zero padding mode are left as they are. Yields the number of patched layers."""
    patched = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _supported(m)]
    try:
        for layer in patched:
            layer._conv_forward = types.MethodType(constant_input_conv2d, layer)
        yield len(patched)
    finally:
        for layer in patched:
            layer.__dict__.pop("_conv_forward", None)
