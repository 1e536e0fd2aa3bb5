"""Which hidden units of a network can be permuted without changing its function, read from the model itself.

Hidden units (neurons, channels) of a layer can be reordered together with the matching rows of the layer that
produces them and the matching columns of every layer that consumes them; the network computes the same function
(Entezari et al. 2022; Ainsworth, Hayase, Srinivasa 2023). :func:`permutation_spec` traces the model with
``torch.fx``, runs it once on an example batch for the shapes, and follows every tensor's channel axis (axis 1):

* a Linear/Conv (``groups=1``) starts a new *group* of units: its weight's axis 0 and its bias belong to the new
  group, its weight's axis 1 to the group of its input; a depthwise Conv (``groups = in = out channels``) keeps
  its input's group (weight axis 0, bias);
* BatchNorm/LayerNorm over the channels keep the group; their weight, bias and running statistics move with it;
* elementwise activations, dropout, pooling, scalar arithmetic keep the group;
* flattening (N, C, H, W) to (N, C·H·W) keeps the group with each unit spanning H·W consecutive features;
* an addition of two tensors (a residual stream) joins their groups into one permutation;
* the network's input and output are fixed: a group joined to either is not permuted.

A group is one permutation π of its units; applying it (:func:`permute_state`) takes, along every axis it touches,
the entries ``π[0], π[1], …`` of the original (new unit i is old unit π[i]). An op the tracer does not understand
raises :class:`UnpermutableError` naming the module (or function) and the op: alignment is refused rather than
guessed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from minima.geometry.directions import StateDict

FIXED = 0  # the group of the input and the output: never permuted

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.relu, torch.tanh, torch.sigmoid,
    F.tanh, F.sigmoid, torch.nn.functional.relu_, torch.relu_,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous", "clone", "float", "to"}
_SCALAR_OPS = {operator.mul, operator.truediv, operator.sub, operator.neg, torch.mul}
_ADD_OPS = {operator.add, operator.iadd, torch.add}
_FLATTEN = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


class UnpermutableError(ValueError):
    """The model contains an op whose effect on hidden units the tracer does not know; it is not aligned."""


@dataclass(frozen=True)
class Axis:
    """One tensor axis a group acts on: state-dict ``key``, ``axis``; each unit spans ``repeat`` consecutive
    indices (H·W for the features of a flattened (C, H, W) map, else 1)."""

    key: str
    axis: int
    repeat: int = 1


@dataclass(frozen=True)
class Group:
    """One permutation: ``size`` units, the tensor axes it moves, the layers that produce its units (``sources``,
    the Linear/Conv modules whose outputs carry them, before any normalisation), and the graph nodes whose values
    carry the units into the next layers (``probes``, for activation matching)."""

    name: str
    size: int
    axes: tuple[Axis, ...]
    sources: tuple[str, ...]
    probes: tuple[str, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Every permutable group of a model, and the state-dict keys that are parameters (not buffers)."""

    groups: tuple[Group, ...]
    parameters: frozenset[str]

    def identity(self) -> dict[str, np.ndarray]:
        """The identity permutation of every group."""
        return {g.name: np.arange(g.size) for g in self.groups}

    def random(self, seed: int) -> dict[str, np.ndarray]:
        """A seeded random permutation of every group (to plant a known permutation)."""
        rng = np.random.default_rng(seed)
        return {g.name: rng.permutation(g.size) for g in self.groups}


def expand(perm: np.ndarray, repeat: int) -> torch.Tensor:
    """Indices of ``perm`` applied to units of ``repeat`` consecutive entries each."""
    p = torch.as_tensor(np.asarray(perm), dtype=torch.long)
    if repeat == 1:
        return p
    return (p[:, None] * repeat + torch.arange(repeat)[None, :]).reshape(-1)


def permute_state(state: StateDict, spec: PermutationSpec, perms: dict[str, np.ndarray]) -> StateDict:
    """``state`` with every group's units reordered by ``perms[group]`` (new unit i = old unit perm[i]); tensors no
    group touches are the same objects."""
    out = dict(state)
    for g in spec.groups:
        idx = expand(perms[g.name], 1)
        if sorted(idx.tolist()) != list(range(g.size)):
            raise ValueError(f"the permutation of group {g.name} is not a permutation of {g.size} units")
        for ax in g.axes:
            out[ax.key] = out[ax.key].index_select(ax.axis, expand(perms[g.name], ax.repeat).to(out[ax.key].device))
    return out


def invert(perm: np.ndarray) -> np.ndarray:
    """The inverse permutation: ``invert(p)[p[i]] == i``.

    >>> invert(np.array([2, 0, 1]))
    array([1, 2, 0])
    """
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


class _Groups:
    """Union–find over group ids; group 0 is the fixed input/output space."""

    def __init__(self) -> None:
        self.parent = [FIXED]
        self.size = [0]
        self.first_source: list[str] = [""]

    def new(self, size: int, source: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.first_source.append(source)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def join(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra != FIXED and rb != FIXED and self.size[ra] != self.size[rb]:
            raise UnpermutableError(f"{where} adds tensors of {self.size[ra]} and {self.size[rb]} channels")
        lo, hi = (ra, rb) if (ra == FIXED or (rb != FIXED and ra < rb)) else (rb, ra)
        self.parent[hi] = lo


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def permutation_spec(model: nn.Module, example: torch.Tensor) -> PermutationSpec:
    """The permutation groups of ``model``, traced with ``torch.fx`` and shaped by one eval-mode forward pass on
    ``example`` (a small input batch; the model's mode and buffers are left as they were).

    Raises :class:`UnpermutableError` (one line) for a model ``torch.fx`` cannot trace or an op it does not know."""
    name = type(model).__name__
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise UnpermutableError(f"torch.fx cannot trace {name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                "alignment needs a model without data-dependent control flow") from exc
    modes = {m: m.training for m in model.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return _spec_from_graph(gm, name, set(model.state_dict()), {k for k, _ in model.named_parameters()})


def traced(model: nn.Module) -> fx.GraphModule:
    """The ``torch.fx`` graph of ``model`` (sharing its modules), as :func:`permutation_spec` reads it."""
    return fx.symbolic_trace(model)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _spec_from_graph(gm: fx.GraphModule, model_name: str, keys: set[str], params: set[str]) -> PermutationSpec:
    groups = _Groups()
    space: dict[fx.Node, tuple[int, int]] = {}  # node → (group, repeat)
    axes: list[tuple[str, int, int, int]] = []  # (key, axis, group, repeat)
    probes: list[tuple[str, int]] = []
    sources: list[tuple[str, int]] = []
    modules = dict(gm.named_modules())

    def refuse(node: fx.Node, what: str) -> UnpermutableError:
        where = f"module {node.target!r}" if node.op == "call_module" else f"{node.op} {_target_name(node)!r}"
        return UnpermutableError(f"cannot permute the hidden units of {model_name}: {where} ({what}) is an op the "
                                 "alignment tracer does not understand; supported: Linear, Conv (groups 1 or "
                                 "depthwise), BatchNorm, LayerNorm, elementwise activations, dropout, pooling, "
                                 "flatten and residual additions")

    def tensor_inputs(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.args if isinstance(a, fx.Node) and a in space]

    def owned(prefix: str, names: Sequence[str], group: int, repeat: int = 1, axis: int = 0) -> None:
        for n in names:
            key = f"{prefix}.{n}" if prefix else n
            if key in keys:
                axes.append((key, axis, group, repeat))

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None:
                space[node] = (FIXED, 1)
            continue
        if node.op == "output":
            out = node.args[0]
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, fx.Node) and o in space:
                    groups.join(space[o][0], FIXED, "the output")
            continue
        if shape is None or len(shape) < 2:  # a size, a shape, a scalar: not a unit-carrying tensor
            if node.op == "get_attr":
                raise refuse(node, "a parameter used outside its module")
            continue
        ins = tensor_inputs(node)
        if node.op == "get_attr":
            raise refuse(node, "a parameter used outside its module")
        if node.op == "call_module":
            mod = modules[str(node.target)]
            prefix = str(node.target)
            if not ins:
                raise refuse(node, type(mod).__name__)
            g_in, rep_in = space[ins[0]]
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                conv = not isinstance(mod, nn.Linear)
                depthwise = conv and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                if conv and mod.groups > 1 and not depthwise:
                    raise refuse(node, f"{type(mod).__name__} with groups={mod.groups}")
                if conv and rep_in != 1:
                    raise refuse(node, "a convolution of flattened features")
                if rep_in == 1:
                    probes.append((ins[0].name, g_in))
                if depthwise:
                    owned(prefix, ("weight", "bias"), g_in)
                    space[node] = (g_in, 1)
                    sources.append((prefix, g_in))
                    continue
                owned(prefix, ("weight",), g_in, rep_in, axis=1)
                g = groups.new(int(shape[1]), prefix)
                owned(prefix, ("weight", "bias"), g)
                sources.append((prefix, g))
                space[node] = (g, 1)
            elif isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if isinstance(mod, nn.LayerNorm) and (len(shape) != 2 or rep_in != 1):
                    raise refuse(node, "LayerNorm over more than the channel axis")
                owned(prefix, ("weight", "bias", "running_mean", "running_var"), g_in, rep_in)
                space[node] = (g_in, rep_in)
            elif isinstance(mod, nn.Flatten):
                space[node] = _flatten(node, ins[0], space, refuse, probes)
            elif isinstance(mod, _ELEMENTWISE_MODULES):
                if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                    owned(prefix, ("weight",), g_in, rep_in)
                space[node] = (g_in, rep_in)
            else:
                raise refuse(node, type(mod).__name__)
        elif node.op == "call_function":
            fn = node.target
            if fn in _ADD_OPS and len(ins) == 2:
                (g1, r1), (g2, r2) = space[ins[0]], space[ins[1]]
                if r1 != r2:
                    raise refuse(node, "an addition of tensors of different layouts")
                groups.join(g1, g2, f"the addition {node.name}")
                space[node] = (groups.find(g1), r1)
            elif fn in _ADD_OPS or fn in _SCALAR_OPS or fn in _ELEMENTWISE_FUNCTIONS:
                if len(ins) != 1:
                    raise refuse(node, "an op combining several tensors")
                space[node] = space[ins[0]]
            elif fn in _FLATTEN:
                space[node] = _flatten(node, ins[0], space, refuse, probes)
            else:
                raise refuse(node, "function")
        elif node.op == "call_method":
            if not ins:
                raise refuse(node, "method")
            if node.target in _FLATTEN_METHODS:
                space[node] = _flatten(node, ins[0], space, refuse, probes)
            elif node.target in _ELEMENTWISE_METHODS or (node.target == "mean" and 1 not in _dims(node)):
                space[node] = space[ins[0]]
            else:
                raise refuse(node, "method")
        else:
            raise refuse(node, node.op)

    return _collect(groups, axes, probes, sources, params)


def _dims(node: fx.Node) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    rank = len(_shape(node.args[0]) or ())
    return {d % rank for d in dims} if dims else set(range(rank))


def _flatten(node: fx.Node, src: fx.Node, space: dict, refuse: Any, probes: list) -> tuple[int, int]:
    """(N, C, *spatial) → (N, C·∏spatial): the group of ``src`` with each unit spanning ∏spatial features."""
    before, after = _shape(src), _shape(node)
    g, rep = space[src]
    if before == after:
        return g, rep
    if before is None or after is None or len(after) != 2 or after[0] != before[0] or rep != 1:
        raise refuse(node, f"a reshape from {before} to {after} that is not a flatten after the batch axis")
    spatial = int(np.prod(before[2:])) if len(before) > 2 else 1
    if spatial > 1:  # a flattened map of one pixel is probed where the next layer takes it
        probes.append((src.name, g))
    return g, spatial


def _collect(groups: _Groups, axes: list[tuple[str, int, int, int]], probes: list[tuple[str, int]],
             sources: list[tuple[str, int]], params: set[str]) -> PermutationSpec:
    by_root: dict[int, dict[str, Any]] = {}
    seen: dict[tuple[str, int], int] = {}
    for key, axis, g, _ in axes:
        root = groups.find(g)
        if (key, axis) in seen and seen[(key, axis)] != root:  # a module used twice on different units
            groups.join(seen[(key, axis)], root, f"the shared tensor {key}")
        seen[(key, axis)] = groups.find(g)
    for key, axis, g, repeat in axes:
        root = groups.find(g)
        if root == FIXED:
            continue
        entry = by_root.setdefault(root, {"axes": {}, "sources": [], "probes": []})
        entry["axes"].setdefault((key, axis), repeat)
    for name, g in probes:
        root = groups.find(g)
        if root in by_root and name not in by_root[root]["probes"]:
            by_root[root]["probes"].append(name)
    for module, g in sources:
        root = groups.find(g)
        if root in by_root and module not in by_root[root]["sources"]:
            by_root[root]["sources"].append(module)
    out = []
    for root in sorted(by_root):
        entry = by_root[root]
        out.append(Group(name=f"P_{groups.first_source[root]}", size=groups.size[root],
                         axes=tuple(Axis(k, a, r) for (k, a), r in entry["axes"].items()),
                         sources=tuple(entry["sources"]), probes=tuple(entry["probes"])))
    return PermutationSpec(groups=tuple(out), parameters=frozenset(params))
