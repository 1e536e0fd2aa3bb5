"""REPAIR (Jordan, Sedghi, Saukh, Entezari, Neyshabur, ICLR 2023): reset the statistics of every hidden unit of an
interpolated network without BatchNorm to the interpolation of the endpoints'.

Between two (aligned) networks the hidden units of θ(α) = (1 − α)·θ_A + α·θ_B lose variance ("variance collapse"),
which alone makes much of the barrier. REPAIR rescales every hidden unit's pre-activation z (the output of each
Linear/Conv that produces permutable units, :mod:`minima.geometry.permute`) so that its mean and standard deviation
on training data equal

    μ_target = (1 − α)·μ_A + α·μ_B,    σ_target = (1 − α)·σ_A + α·σ_B,    σ = √(var + ε),

the statistics of the endpoints' own units (population statistics over every image and position of the data, ε =
:data:`EPS`); on the plane through three checkpoints, the same mixture with the point's barycentric weights (outside
their triangle the weights extrapolate, and a σ_target below 0 is clamped to 0). The correction is an affine map per
unit, z ↦ (z − μ)/√(var + ε)·σ_target + μ_target, held by a BatchNorm layer inserted after the layer (eval mode,
running statistics μ and var of z *as the corrected network computes it*): the layers are corrected in order, each
measured after the ones before it are fixed — one pass over the data per layer, exact (Jordan et al. measure all
layers in one pass with BatchNorm in batch mode, which is exact only when one batch holds the data). The inserted
layers fold into the preceding ones for evaluation. At α = 0 and α = 1 the correction is the identity up to float
rounding.

A network with BatchNorm has its own equivalent reset: re-estimating its running statistics at every point
(``--bn recompute``); REPAIR is for networks without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from minima.data import Split
from minima.geometry.directions import StateDict
from minima.geometry.evaluate import Batching
from minima.geometry.permute import PermutationSpec, permutation_spec
from minima.geometry.points import EvalData, EvalSettings
from minima.models import has_batchnorm

#: Added to variances before a square root (BatchNorm's default ε).
EPS = 1e-5
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer → (mean, unbiased variance) per unit, float64
_BN_FOR = {nn.Linear: nn.BatchNorm1d, nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def repaired_layers(spec: PermutationSpec) -> list[str]:
    """The layers whose outputs REPAIR corrects: every Linear/Conv that produces hidden (permutable) units."""
    return [src for g in spec.groups for src in g.sources]


def repaired_model(model: nn.Module, layers: list[str]) -> nn.Module:
    """A copy of ``model`` with each layer of ``layers`` replaced by ``Sequential(layer, BatchNorm)`` (the layer's
    parameters become ``<layer>.0.*``, the inserted BatchNorm's ``<layer>.1.*``)."""
    out = copy.deepcopy(model)
    for path in layers:
        layer = out.get_submodule(path)
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        bn = _BN_FOR[type(layer)](width, eps=EPS)
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, name, nn.Sequential(layer, bn))
    return out


def _set_bn(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        for buf, value in ((bn.running_mean, mean), (bn.running_var, var), (bn.weight, weight), (bn.bias, bias)):
            buf.copy_(value.to(buf.dtype))


def target(stats: Sequence[Stats], weights: Sequence[float], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ_target, σ_target) of ``layer``'s units: the endpoints' statistics mixed with ``weights`` (1 − α, α on a
    line)."""
    mu = sum(w * st[layer][0] for w, st in zip(weights, stats, strict=True))
    sigma = sum(w * torch.sqrt(st[layer][1] + EPS) for w, st in zip(weights, stats, strict=True))
    return mu, sigma.clamp_min(0.0)


def repair_state(work: nn.Module, state: StateDict, layers: list[str], stats: Sequence[Stats],
                 weights: Sequence[float], split: Split, mean: tuple[float, ...], std: tuple[float, ...],
                 feed: Batching) -> StateDict:
    """The state of the repaired model ``work`` (:func:`repaired_model`) at ``state`` (the point θ): the layers'
    tensors renamed into their ``Sequential``, then every inserted BatchNorm set, layer by layer in order, to map
    its input's statistics on ``split`` to (μ_target, σ_target) of ``weights``. ``work`` is used as scratch."""
    moved = {f"{layer}.": f"{layer}.0." for layer in layers}
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in moved if key.startswith(p)), None)
        renamed[moved[prefix] + key[len(prefix):] if prefix else key] = value
    work.load_state_dict({**work.state_dict(), **renamed})
    for layer in layers:  # start from the identity everywhere
        bn = work.get_submodule(f"{layer}.1")
        ones = torch.ones_like(bn.weight)
        _set_bn(bn, torch.zeros_like(ones), ones - EPS, ones, torch.zeros_like(ones))
    for layer in layers:  # the model's order: each layer measured with the ones before it corrected
        z_mean, z_var = unit_statistics(work, [f"{layer}.0"], split, mean, std, feed)[f"{layer}.0"]
        mu, sigma = target(stats, weights, layer)
        _set_bn(work.get_submodule(f"{layer}.1"), z_mean, z_var, sigma, mu)
    return {k: v.detach().clone() for k, v in work.state_dict().items()}


class Repairer:
    """REPAIR between given endpoints for the grid runner: refuses a network with BatchNorm, traces the hidden
    layers, measures each endpoint's unit statistics once on ``d.bn_split`` (as ``s`` evaluates), and gives the
    repaired model (:attr:`Repairer.model`, what the grid evaluates) and the state at any point
    (:meth:`Repairer.state`)."""

    #: The repaired network: the model with a rescaling after each traced hidden layer; what the grid evaluates.
    model: nn.Module

    def __init__(self, model: nn.Module, endpoints: Sequence[StateDict], example: torch.Tensor, d: EvalData,
                 s: EvalSettings) -> None:
        if has_batchnorm(model):
            raise ValueError("--repair is for networks without BatchNorm; this one has BatchNorm, whose "
                             "re-estimation at every point (--bn recompute, the default) is the equivalent reset")
        self.layers = repaired_layers(permutation_spec(model, example))
        if not self.layers:
            raise ValueError("--repair: this network has no hidden units to repair")
        self.d, self.s = d, s
        work = s.place(copy.deepcopy(model))
        self.stats = []
        for state in endpoints:
            work.load_state_dict(state)
            with s.compute():
                self.stats.append(unit_statistics(work, self.layers, d.bn_split, d.mean, d.std, s.feed))
        self.model = repaired_model(model, self.layers)
        self.scratch = s.place(copy.deepcopy(self.model))

    def state(self, theta: StateDict, weights: Sequence[float]) -> StateDict:
        """The repaired model's state at the point ``theta`` whose endpoint weights are ``weights``."""
        with self.s.compute():
            return repair_state(self.scratch, theta, self.layers, self.stats, weights, self.d.bn_split, self.d.mean,
                                self.d.std, self.s.feed)


@torch.inference_mode()
def unit_statistics(model: nn.Module, layers: list[str], split: Split, mean: tuple[float, ...],
                    std: tuple[float, ...], feed: Batching) -> Stats:
    """Per module of ``layers``, the mean and population variance of each unit of its output over every image (and
    position) of ``split``, in float64 (eval mode; the model's modes are restored)."""
    sums: dict[str, list] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(_: nn.Module, __: tuple, out: torch.Tensor) -> None:
            z = out.movedim(1, -1).reshape(-1, out.shape[1]).double()
            part = [z.sum(0), (z * z).sum(0), z.shape[0]]
            sums[name] = part if name not in sums else [s + p for s, p in zip(sums[name], part, strict=True)]
        return record

    modes = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    model.eval()
    try:
        for x, _ in feed.batches(split, mean, std):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    out = {}
    for name, (s1, s2, n) in sums.items():
        m = s1 / n
        out[name] = (m.cpu(), (s2 / n - m * m).clamp_min(0).cpu())
    return out
