"""Parameter blocks: which parameters a curvature metric is restricted to, as the diagonal block H_BB of the Hessian.

``--blocks`` takes ``all`` (the whole network: no blocks), ``layers`` (each weight tensor with its bias:
``net.1.weight`` with ``net.1.bias``, ``lstm.weight_ih_l0`` with ``lstm.bias_ih_l0``; any other parameter alone),
``modules`` (every module's own parameters together) or a comma-separated list of regular expressions (each one
block of the parameter names it matches with ``re.search``). A regex that selects nothing, or two regexes that
select one parameter, is refused in one line (the first lists the parameter names).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

KEYWORDS = ("all", "layers", "modules")


@dataclass(frozen=True)
class Block:
    """One block: its label (used in result names), its parameter names and its coordinates in the flat vector."""

    label: str
    names: tuple[str, ...]
    index: torch.Tensor

    @property
    def size(self) -> int:
        """The number of parameters in the block."""
        return int(self.index.numel())


def _layer_key(name: str) -> str:
    """``net.1.weight`` → ``net.1``; ``lstm.weight_ih_l0``/``lstm.bias_ih_l0`` → ``lstm._ih_l0``; else the name."""
    prefix, _, leaf = name.rpartition(".")
    for kind in ("weight", "bias"):
        if leaf.startswith(kind):
            suffix = leaf[len(kind):]
            return f"{prefix}.{suffix}" if suffix else prefix
    return name


def _label(members: list[str], spec: str) -> str:
    """A block's name: the module for ``modules``; for ``layers`` the layer (``net.1``), or the weight's own name when
    the module holds several (``lstm.weight_ih_l0``)."""
    prefix, _, leaf = members[0].rpartition(".")
    if spec == "modules":
        return prefix or members[0]
    return prefix if prefix and leaf in ("weight", "bias") else members[0]


def parameter_blocks(named: Sequence[tuple[str, int]], spec: str) -> list[Block]:
    """The blocks ``spec`` selects among the parameters ``named`` ((name, numel) in the flat vector's order); an
    empty list for ``all``."""
    spec = spec.strip()
    if spec in ("", "all"):
        return []
    offsets, start = {}, 0
    for name, numel in named:
        offsets[name] = (start, int(numel))
        start += int(numel)
    names = [n for n, _ in named]
    groups: dict[str, list[str]] = {}
    if spec in ("layers", "modules"):
        for n in names:
            key = _layer_key(n) if spec == "layers" else (n.rpartition(".")[0] or n)
            groups.setdefault(key, []).append(n)
        labels = {key: _label(members, spec) for key, members in groups.items()}
    else:
        owner: dict[str, str] = {}
        labels = {}
        for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"--blocks {pattern!r} is not a regular expression ({exc})") from exc
            hits = [n for n in names if rx.search(n)]
            if not hits:
                raise ValueError(f"--blocks {pattern!r} selects no parameter; the parameters are: {', '.join(names)}")
            for n in hits:
                if n in owner:
                    raise ValueError(f"--blocks {owner[n]!r} and {pattern!r} both select {n}; blocks must not overlap")
                owner[n] = pattern
            groups[pattern], labels[pattern] = hits, pattern
    blocks = []
    for key, members in groups.items():
        index = torch.cat([torch.arange(offsets[n][0], offsets[n][0] + offsets[n][1]) for n in members])
        blocks.append(Block(labels[key], tuple(members), index))
    return blocks


def flat_index(named: Sequence[tuple[str, int]], names: Sequence[str]) -> torch.Tensor:
    """The coordinates of the parameters ``names`` in the flat vector of ``named`` ((name, numel) in order)."""
    offsets, start = {}, 0
    for name, numel in named:
        offsets[name] = (start, int(numel))
        start += int(numel)
    missing = [n for n in names if n not in offsets]
    if missing:
        raise ValueError(f"block parameters {missing} are not parameters of this model")
    return torch.cat([torch.arange(offsets[n][0], offsets[n][0] + offsets[n][1]) for n in names])



def module_kind(module: nn.Module) -> str:
    """A layer as a reader names it: ``Linear 3072→512``, ``Conv 64→128 3×3``, ``BatchNorm 512``; else its class."""
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"Conv {module.in_channels}→{module.out_channels} {'×'.join(str(k) for k in module.kernel_size)}"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"BatchNorm {module.num_features}"
    if isinstance(module, nn.LayerNorm):
        return f"LayerNorm {'×'.join(str(s) for s in module.normalized_shape)}"
    return type(module).__name__


def describe_block(model: nn.Module, names: Sequence[str]) -> str:
    """The modules that own a block's parameters (``names``), each as :func:`module_kind` says, in order."""
    owners: list[str] = []
    for name in names:
        owner = name.rpartition(".")[0]
        if owner not in owners:
            owners.append(owner)
    return ", ".join(module_kind(model.get_submodule(o)) if o else type(model).__name__ for o in owners)
