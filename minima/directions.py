"""Parameter-space geometry: θ(α) between two state dicts, random filter-normalised directions, and the
BatchNorm policy along a path.

Only floating-point entries of a state dict are moved; integer buffers (``num_batches_tracked``) are
taken from the base point, never interpolated. Arithmetic is done in float64 and cast back to each
entry's dtype, and the segment uses ``(1 − α)·θ_A + α·θ_B`` so that α = 0 and α = 1 give θ_A and θ_B
*exactly*.
"""

from __future__ import annotations

import torch
from torch import nn

BN_POLICIES = ("recompute", "batch", "interpolate")
StateDict = dict[str, torch.Tensor]


def bn_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of BatchNorm running statistics (``running_mean``/``running_var``)."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            names.update(f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var"))
    return names


def lerp_state(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    """θ(α) = (1 − α)·θ_A + α·θ_B for floating entries (float64 arithmetic); other entries from A."""
    out = {}
    for key, ta in a.items():
        if ta.is_floating_point():
            mixed = (1.0 - alpha) * ta.to(torch.float64) + alpha * b[key].to(torch.float64)
            out[key] = mixed.to(ta.dtype)
        else:
            out[key] = ta.clone()
    return out


def shift_state(base: StateDict, direction: StateDict, alpha: float) -> StateDict:
    """θ + α·d for floating entries present in ``direction``; everything else copied from ``base``."""
    out = {}
    for key, t in base.items():
        if t.is_floating_point() and key in direction:
            out[key] = (t.to(torch.float64) + alpha * direction[key].to(torch.float64)).to(t.dtype)
        else:
            out[key] = t.clone()
    return out


def random_direction(model: nn.Module, state: StateDict, seed: int, filter_normalize: bool = True) -> StateDict:
    """A Gaussian direction over the trainable weights of ``model`` at ``state`` (Li et al. 2018).

    With ``filter_normalize`` each filter d_i (one output row of a conv/linear weight) is rescaled to the
    norm of the matching filter of θ: d_i ← d_i · ‖θ_i‖ / ‖d_i‖. One-dimensional parameters (biases,
    BatchNorm scale/shift) and buffers get a zero direction, as in Li et al.'s default, so the plot
    reflects the weights whose scale invariance filter normalisation is designed for.
    """
    gen = torch.Generator().manual_seed(seed)
    direction: StateDict = {}
    for name, p in model.named_parameters():
        theta = state[name].to(torch.float64)
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(theta)
            continue
        d = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        if filter_normalize:
            d_flat, t_flat = d.reshape(d.shape[0], -1), theta.reshape(theta.shape[0], -1)
            scale = t_flat.norm(dim=1) / d_flat.norm(dim=1).clamp_min(1e-30)
            d = (d_flat * scale[:, None]).reshape(theta.shape)
        direction[name] = d
    return direction


def negative_variance_channels(state: StateDict, bn_names: set[str]) -> int:
    """Number of BatchNorm channels whose running variance is negative (an interpolation artefact:
    (1 − α)·v_A + α·v_B < 0 for α outside [0, 1]); evaluating with them gives NaN activations."""
    return int(sum(int((state[k] < 0).sum()) for k in bn_names if k.endswith("running_var")))
