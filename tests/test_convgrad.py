from __future__ import annotations

import pytest
import torch
from torch import nn

from minima.curvature.convgrad import constant_input_conv2d, constant_input_convs


def _first_and_second_derivatives(conv: nn.Conv2d, x: torch.Tensor, u: list[torch.Tensor],
                                  weight_only: bool) -> list[torch.Tensor]:
    """∇_θ L and (∂∇_θ L/∂θ)ᵀu for L = Σ tanh(conv(x))² (curved, so the Hessian is not zero)."""
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    out = constant_input_conv2d(conv, x, conv.weight, conv.bias) if weight_only else conv(x)
    grads = torch.autograd.grad(torch.tanh(out).pow(2).sum(), params, create_graph=True)
    hv = torch.autograd.grad(grads, params, u[: len(params)])
    return [g.detach() for g in grads] + list(hv)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 2, 1), (2, 1, 1), (1, 0, 3)])
def test_constant_input_conv_matches_autograd_to_second_order(bias: bool, stride: int, padding: int,
                                                               groups: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 5 if padding == 2 else 3, stride=stride, padding=padding, groups=groups,
                     bias=bias).double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    u = [torch.randn_like(conv.weight), torch.randn(6, dtype=torch.float64)]
    want = _first_and_second_derivatives(conv, x, u, weight_only=False)
    got = _first_and_second_derivatives(conv, x, u, weight_only=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bias_only_direction_and_fallbacks() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    ub = torch.randn(4, dtype=torch.float64)
    for weight_only in (True, False):  # the second derivative along the bias alone (no weight direction)
        out = constant_input_conv2d(conv, x, conv.weight, conv.bias) if weight_only else conv(x)
        _, g_b = torch.autograd.grad(torch.tanh(out).pow(2).sum(), [conv.weight, conv.bias], create_graph=True)
        hv = torch.autograd.grad(g_b, [conv.weight, conv.bias], ub)
        if weight_only:
            got = hv
        else:
            torch.testing.assert_close(got[0], hv[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[1], hv[1], rtol=1e-12, atol=1e-12)
    # an input that needs its gradient, or no autograd at all, takes the plain convolution
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(constant_input_conv2d(conv, xg, conv.weight, conv.bias).sum(), [xg])
    torch.testing.assert_close(gx, torch.autograd.grad(conv(xg).sum(), [xg])[0])
    with torch.no_grad():
        torch.testing.assert_close(constant_input_conv2d(conv, x, conv.weight, conv.bias), conv(x))


def test_context_patches_and_restores_every_conv() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = model(x)
    with constant_input_convs(model) as patched:
        assert patched == 2 and all("_conv_forward" in m.__dict__ for m in model if isinstance(m, nn.Conv2d))
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    assert all("_conv_forward" not in m.__dict__ for m in model)
    same = nn.Sequential(nn.Conv2d(1, 1, 3, padding="same"), nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    with constant_input_convs(same) as patched:  # unsupported padding: left as it is
        assert patched == 0 and all("_conv_forward" not in m.__dict__ for m in same)
    with pytest.raises(ValueError, match="explicit zero padding"):
        constant_input_conv2d(same[0], x, same[0].weight, same[0].bias)
