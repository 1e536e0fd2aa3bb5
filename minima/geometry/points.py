"""One point of parameter space evaluated exactly: the evaluation spec, the data, and the BatchNorm policy.

A point of any grid — θ(α) on a segment, θ + x·d1 + y·d2 on a plane — is a state dict evaluated on the training and
test splits (:func:`minima.geometry.evaluate.evaluate`) with an explicit BatchNorm policy:

* ``recompute``: reset the running statistics at the point and re-estimate them on training data (a cumulative
  average over fixed batches, dropout off), then evaluate in eval mode;
* ``batch``: normalise with each evaluation batch's own statistics (what Keskar's scripts effectively did);
* ``interpolate``: use the moved running statistics; channels with a negative variance are counted (their
  activations are NaN, so those samples show up as non-finite, never as silent zeros).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from minima.core.vocab import BNMode, BNPolicy, Loss, check_choice
from minima.data import Split
from minima.geometry.directions import StateDict, negative_variance_channels
from minima.geometry.evaluate import Batching, EvalResult, evaluate, recompute_bn_stats
from minima.geometry.fold import fold_batchnorm

CPU = torch.device("cpu")


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation spec: BN policy, batch size, dtype, device, memory format, BN folding. The numerics are
    called through :meth:`evaluate` and :meth:`recompute_bn` with :attr:`feed`."""

    bn: BNPolicy = "recompute"
    batch_size: int = 1000
    dtype: torch.dtype = torch.float32
    device: torch.device = CPU
    channels_last: bool = False
    fold_bn: bool = True
    loss: Loss = "cross_entropy"

    def __post_init__(self) -> None:
        check_choice("BatchNorm policy", self.bn, BNPolicy)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the parameters and input batches (float32 under bfloat16 autocast)."""
        return torch.float32 if self.dtype == torch.bfloat16 else self.dtype

    @property
    def feed(self) -> Batching:
        """How the data is fed: batch size, device, (storage) dtype, memory format."""
        return Batching(self.batch_size, self.device, self.storage_dtype, self.channels_last)

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every forward pass runs in: bfloat16 autocast for ``dtype=bfloat16``, else nothing."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved (in place) to this device, (storage) dtype and memory format."""
        model = model.to(self.device, dtype=self.storage_dtype)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def evaluate(self, model: nn.Module, split: Split, mean: tuple[float, ...], std: tuple[float, ...],
                 bn: BNMode = "eval", batch_size: int | None = None) -> EvalResult:
        """:func:`minima.geometry.evaluate.evaluate` with this spec, inside :meth:`compute`."""
        feed = self.feed if batch_size is None else replace(self.feed, batch_size=batch_size)
        with self.compute():
            return evaluate(model, split, mean, std, feed, bn=bn, loss=self.loss)

    def recompute_bn(self, model: nn.Module, split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """:func:`minima.geometry.evaluate.recompute_bn_stats` with this spec, inside :meth:`compute`."""
        with self.compute():
            recompute_bn_stats(model, split, mean, std, self.feed)


@dataclass(frozen=True)
class EvalData:
    """What every point is evaluated on: the train and test splits, the split BatchNorm statistics are
    re-estimated on (``bn_split``, for ``recompute``), and the input normalisation the models were trained with."""

    train: Split
    test: Split
    bn_split: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def evaluate_point(model: nn.Module, state: StateDict, d: EvalData, s: EvalSettings,
                   bn_names: set[str]) -> dict[str, float | int]:
    """Load ``state`` into ``model`` (a private working copy), apply the BN policy, evaluate both splits;
    return one point of a grid file (the keys of :data:`POINT_FIELDS`)."""
    model.load_state_dict(state)
    negative = negative_variance_channels(state, bn_names) if s.bn == "interpolate" else 0
    if s.bn == "recompute" and bn_names:
        s.recompute_bn(model, d.bn_split, d.mean, d.std)
    use_batch = s.bn == "batch"
    # Folding BN into the preceding conv/linear is exact in eval mode (running statistics) and saves a pass
    # over every activation; with per-batch statistics it does not apply.
    net = fold_batchnorm(model) if (s.fold_bn and not use_batch and bn_names) else model
    row: dict[str, float | int] = {"bn/negative_variance": negative}
    for name, split in (("train", d.train), ("test", d.test)):
        res = s.evaluate(net, split, d.mean, d.std, bn="batch" if use_batch else "eval")
        row.update({f"{name}/loss": res.loss, f"{name}/accuracy": res.accuracy, f"{name}/nonfinite": res.nonfinite})
    return row
