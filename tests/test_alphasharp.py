"""Jiang's magnitude-aware α′ sharpness (PGDL's baseline): the drop it finds, its growth with α, ReLU rescaling."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from minima.curvature.alphasharp import AlphaSearch, alpha_sharpness, worst_accuracy
from minima.curvature.pacbayes import accuracy


@functools.cache
def _fitted() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 ReLU MLP fitted to 200 points of 4 Gaussian blobs (training accuracy near 1), made once."""
    torch.manual_seed(0)
    centres = torch.randn(4, 6, dtype=torch.float64) * 2
    y = torch.arange(200) % 4
    x = centres[y] + 0.6 * torch.randn(200, 6, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, [(x[:100], y[:100]), (x[100:], y[100:])]


def _trained() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    model, batches = _fitted()
    return copy.deepcopy(model), batches


def test_the_radius_found_lowers_the_accuracy_by_the_target_and_larger_radii_lower_it_more() -> None:
    model, batches = _trained()
    base = accuracy(model, batches)
    assert base > 0.95
    found = alpha_sharpness(model, batches, AlphaSearch(depth=14, steps=5, drop=0.1))
    drop = base - worst_accuracy(model.eval(), batches, found["alpha"], 5)
    assert abs(drop - 0.1) <= 0.01 + 1e-12, (found, drop)
    assert found["value"] == 1 / found["alpha"] ** 2 and 0 < found["alpha"] < 2
    drops = [base - worst_accuracy(model, batches, a, 5) for a in (0.0, 0.3 * found["alpha"], found["alpha"],
                                                                    3 * found["alpha"])]
    assert drops[0] == 0 and drops == sorted(drops) and drops[-1] > 0.1, drops


def test_alpha_is_invariant_to_rescaling_a_relu_layer_and_the_next() -> None:
    model, batches = _trained()
    scaled = copy.deepcopy(model)
    with torch.no_grad():  # ×3 on the first layer (weights and bias), ÷3 on the second: the same function
        scaled[0].weight.mul_(3.0)
        scaled[0].bias.mul_(3.0)
        scaled[2].weight.div_(3.0)
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(scaled(x), model(x))
    a = alpha_sharpness(model, batches)["alpha"]
    b = alpha_sharpness(scaled, batches)["alpha"]
    assert abs(a - b) < 1e-9, (a, b)
