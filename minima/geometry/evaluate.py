"""Exact dataset loss and accuracy, and BatchNorm running-statistics re-estimation.

Two losses, chosen per training run and honoured by every analysis of its checkpoints (:func:`recorded_loss`):
``cross_entropy`` (the default) and ``mse``, ½ Σ_k (f_k − onehot(y)_k)² per sample (Cohen et al. 2021's square
loss), both averaged over samples. Cross-entropy per sample is ``−log_softmax(logits)[y]`` — the numerically stable
form (log-sum-exp with the max subtracted), finite even for logits of order 1e4 where ``softmax`` then ``log``
underflows to −inf. Per-sample losses are summed in float64 over the whole split and divided by the exact sample
count (never a mean of batch means). A sample whose loss is not finite is *counted* in ``nonfinite`` and left out of
the sum, so one NaN never silently turns into an average.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minima.core import distributed
from minima.core.vocab import BNMode, Loss, check_choice
from minima.data import Dataset, Split, eval_batches, normalize, shard
from minima.files.checkpoint import load_model


@dataclass(frozen=True)
class Batching:
    """How a split is fed to a model: ``batch_size`` images at a time, moved to ``device``, normalised into
    ``dtype``, in ``channels_last`` memory format or not. The one argument every evaluation takes for these."""

    batch_size: int = 1000
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def batches(self, split: Split, mean: Sequence[float], std: Sequence[float]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised inputs, labels) on the device, in the split's order."""
        for images, labels in eval_batches(split, self.batch_size):
            x = normalize(images.to(self.device, non_blocking=True), mean, std, self.dtype, self.channels_last)
            yield x, labels.to(self.device, non_blocking=True)


@dataclass(frozen=True)
class EvalResult:
    """Sums over a split. ``loss`` is the mean over the samples whose loss was finite (NaN if none)."""

    loss_sum: float
    correct: int
    count: int
    nonfinite: int

    @property
    def loss(self) -> float:
        """The mean loss over the samples whose loss is finite (NaN when none is)."""
        finite = self.count - self.nonfinite
        return self.loss_sum / finite if finite > 0 else float("nan")

    @property
    def accuracy(self) -> float:
        """Fraction of all samples classified correctly, in [0, 1]."""
        return self.correct / self.count if self.count > 0 else float("nan")


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``−log_softmax(logits)[y]`` per sample, in the dtype of ``logits``."""
    return -torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, loss: Loss = "cross_entropy") -> torch.Tensor:
    """The loss of every sample, in the dtype of ``logits``: cross-entropy, or ½ Σ_k (f_k − onehot(y)_k)²."""
    if loss == "cross_entropy":
        return per_sample_cross_entropy(logits, labels)
    if loss == "mse":
        target = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return 0.5 * ((logits - target) ** 2).sum(dim=1)
    raise ValueError(f"unknown loss {loss!r}; choose one of cross_entropy, mse")


def recorded_loss(meta: dict) -> Loss:
    """The loss a checkpoint was trained with (``meta["train_config"]["loss"]``; cross-entropy for checkpoints
    written before the choice existed)."""
    return (meta.get("train_config") or {}).get("loss", "cross_entropy")


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, loss: Loss = "cross_entropy") -> torch.Tensor:
    """float64 tensor ``[loss_sum over finite samples, correct, count, nonfinite]`` for one batch.

    Kept as a tensor (no ``.item()``) so hot loops never synchronise with the device. Logits of a
    low-precision forward pass (bfloat16/float16 autocast) are upcast to float32 before the log-softmax, so
    only the network is approximate, not the loss of its logits.
    """
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    losses = per_sample_loss(logits, labels, loss).to(torch.float64)
    finite = torch.isfinite(losses)
    correct = (logits.argmax(dim=1) == labels).sum()
    return torch.stack([
        torch.where(finite, losses, torch.zeros_like(losses)).sum(),
        correct.to(torch.float64),
        torch.tensor(float(labels.numel()), dtype=torch.float64, device=logits.device),
        (~finite).sum().to(torch.float64),
    ])


def sums_to_result(sums: torch.Tensor) -> EvalResult:
    """An :class:`EvalResult` from the four sums (loss, correct, count, non-finite) of an evaluation."""
    loss_sum, correct, count, nonfinite = sums.tolist()
    return EvalResult(loss_sum=loss_sum, correct=int(correct), count=int(count), nonfinite=int(nonfinite))


@contextlib.contextmanager
def bn_mode(model: nn.Module, bn: BNMode) -> Iterator[None]:
    """Eval mode for everything (dropout off); with ``bn="batch"`` BatchNorm layers normalise with per-batch
    statistics *without* touching their running buffers. Restores every module's mode after."""
    check_choice("BatchNorm mode", bn, BNMode)
    modes = {m: m.training for m in model.modules()}
    saved: dict[nn.Module, float | None] = {}
    model.eval()
    try:
        if bn == "batch":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    # track_running_stats=False makes BN use batch statistics and leave buffers alone.
                    saved[m] = m.track_running_stats
                    m.track_running_stats = False
                    m.train()
        yield
    finally:
        for m, tracked in saved.items():
            m.track_running_stats = tracked
        for m, mode in modes.items():
            m.train(mode)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: Split,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    feed: Batching = Batching(),
    *,
    bn: BNMode = "eval",
    rank: int = 0,
    world_size: int = 1,
    loss: Loss = "cross_entropy",
) -> EvalResult:
    """Exact loss and accuracy of ``model`` on ``split`` (dropout off), fed as ``feed`` says.

    With ``bn="batch"`` BatchNorm uses the statistics of each evaluation batch (fixed order, so the
    result is deterministic), with ``bn="eval"`` its running statistics. Under ``world_size > 1`` each rank
    evaluates a contiguous shard and the sums are all-reduced, so every rank returns the full-split result.
    The model's mode and buffers are left as they were.
    """
    mine = split if world_size == 1 else split.take(shard(torch.arange(len(split)), rank, world_size))
    sums = torch.zeros(4, dtype=torch.float64, device=feed.device)
    with bn_mode(model, bn):
        for x, labels in feed.batches(mine, mean, std):
            sums += batch_sums(model(x), labels, loss)
    if world_size > 1:
        sums = distributed.all_reduce_sum(sums)
    return sums_to_result(sums.cpu())


def reset_bn_stats(model: nn.Module) -> int:
    """Reset every BatchNorm's running mean/var and ``num_batches_tracked``; return how many layers."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
            count += 1
    return count


@torch.inference_mode()
def recompute_bn_stats(
    model: nn.Module,
    split: Split,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    feed: Batching = Batching(),
) -> None:
    """Re-estimate BatchNorm running statistics on ``split`` as a *cumulative* average over its batches
    (``momentum=None``), with dropout off; leaves the model in eval mode with momenta restored.

    The running mean becomes the exact mean of the batch means, and the running variance the mean of the
    unbiased per-batch variances — with one batch covering the split, exactly the split's statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    reset_bn_stats(model)
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.momentum = None  # cumulative moving average
            m.train()
        for x, _ in feed.batches(split, mean, std):
            model(x)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.eval()


def check_model_accepts(model: nn.Module, ds: Dataset) -> None:
    """One forward pass on two samples (eval mode, no grad) so a model/data shape mismatch fails now,
    with both shapes named, rather than deep inside the first step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(normalize(ds.train.images[:2], ds.mean, ds.std))
    except RuntimeError as exc:
        raise ValueError(f"the model cannot take this data's images of shape {ds.image_shape} ({exc}); "
                         "use data of the shape the model was built for, or adjust the model arguments") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or not out.is_floating_point():
        got = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
               else f"a {type(out).__name__}")
        raise ValueError(f"the model returned {got} for 2 images; minima needs logits of shape (N, classes) — return "
                         "the last layer's output (no softmax, no tuple)")
    if out.shape[1] != ds.num_classes:
        raise ValueError(f"the model has {out.shape[1]} outputs but the data has {ds.num_classes} classes; build it "
                         f"with {ds.num_classes} outputs (e.g. --model-kwargs '{{\"num_classes\": {ds.num_classes}}}') "
                         "or use data with that many classes")


def evaluate_checkpoint(path: str | os.PathLike[str], splits: dict[str, Split], batch_size: int = 1000,
                        trusted: Iterable[str] = ()) -> dict[str, EvalResult]:
    """Exact loss/accuracy of a checkpoint's model on each named split, with the input normalisation the
    checkpoint was trained with (its ``meta["data"]`` mean/std)."""
    model, meta = load_model(path, trusted=trusted)
    mean, std = meta["data"]["mean"], meta["data"]["std"]
    return {name: evaluate(model, split, mean, std, Batching(batch_size)) for name, split in splits.items()}
