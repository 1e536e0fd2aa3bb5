"""Batches from splits: normalisation statistics and normalisation, batched augmentation, epoch permutations,
rank shards, global and evaluation batches — pure tensor functions, on any device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from minima.data.splits import DataError, Split


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images, in units of pixel/255.

    Accumulated in float64 channel by channel so 50,000 CIFAR images need no float copy of the data.
    """
    means, stds = [], []
    for c in range(images.shape[1]):
        x = images[:, c].to(torch.float64) / 255.0
        means.append(float(x.mean()))
        stds.append(float(x.std(unbiased=False)))
    if any(s == 0.0 for s in stds):
        raise DataError("a channel of the training images is constant (std 0); cannot normalise")
    return tuple(means), tuple(stds)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """``(images/255 − mean) / std`` per channel, for a uint8 batch (N, C, H, W) on any device.

    With ``channels_last`` the result uses ``torch.channels_last`` memory format (faster convolutions on
    CPU with oneDNN and on GPUs); values are identical.
    """
    x = images.to(dtype)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=dtype, device=x.device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=dtype,
                         device=x.device).view(1, -1, 1, 1)
    x = x * scale - shift
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# -------------------------------------------------------------------------------------- augmentation
def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with ``pad`` zero pixels on each side, then random horizontal flip, on a batch.

    Works on the uint8 batch (N, C, H, W) before normalisation, entirely with tensor indexing (no per-image
    Python loop). The draws come from ``generator`` (a CPU generator), so a seed reproduces the batch.
    """
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    do_flip = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    dev = images.device
    offsets, do_flip = offsets.to(dev), do_flip.to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[0][:, None] + torch.arange(h, device=dev)[None, :]  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=dev)[None, :]  # (N, W)
    # A horizontal flip is the crop read right-to-left.
    cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, p: float = 1.0) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017) on a normalised batch (N, C, H, W): per image one ``size`` × ``size`` square,
    its centre drawn uniformly over the pixels (the square clipped at the border, so it may be smaller), set to 0 —
    the data's mean — in every channel; with ``p`` < 1 each image gets its square with probability ``p`` (davda54/sam's
    recipe: 0.5). The centres (then, for ``p`` < 1, one uniform draw per image) come from ``generator`` (a CPU
    generator)."""
    n, _, h, w = images.shape
    centres = torch.stack([torch.randint(0, h, (n,), generator=generator),
                           torch.randint(0, w, (n,), generator=generator)]).to(images.device)
    top, left = centres[0] - size // 2, centres[1] - size // 2
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    keep = ~(inside_rows[:, :, None] & inside_cols[:, None, :])  # (N, H, W)
    if p < 1:
        spared = (torch.rand(n, generator=generator) >= p).to(images.device)  # these images keep every pixel
        keep = keep | spared[:, None, None]
    return images * keep[:, None].to(images.dtype)



def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a permutation of ``range(n)`` that every rank computes identically."""
    # Mix seed and epoch into one 63-bit seed so (seed, epoch) pairs never collide in practice.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=gen)


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous, disjoint part of ``indices``; the parts of all ranks cover it in order.

    Sizes differ by at most one (the first ``len % world_size`` ranks take one more).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}; got {rank}")
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return indices[start : start + base + (1 if rank < extra else 0)]


def global_batches(perm: torch.Tensor, global_batch: int) -> list[torch.Tensor]:
    """Consecutive global batches of ``perm``; an incomplete final batch is dropped (every step sees
    exactly ``global_batch`` samples, so every optimiser step has the same scale)."""
    n_steps = len(perm) // global_batch
    return [perm[i * global_batch : (i + 1) * global_batch] for i in range(n_steps)]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) in fixed dataset order, ``batch_size`` at a time (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1; got {batch_size}")
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]

