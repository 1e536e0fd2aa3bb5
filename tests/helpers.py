"""Tiny checkpoints on synthetic data for the analysis tests."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from minima import data
from minima.files import checkpoint as ck
from minima.models import build_model

SHAPE = (3, 4, 4)


def toy_dataset(num_classes: int = 3) -> data.Dataset:
    return data.synthetic(n_train=96, n_test=48, image_shape=SHAPE, num_classes=num_classes, seed=4)


def toy_checkpoint(path: Path, seed: int, ds: data.Dataset, batchnorm: bool = False, widths: tuple = (6,),
                   scale_last: float = 1.0) -> Path:
    """An MLP checkpoint with seeded random weights (and BN running statistics perturbed away from their
    defaults so interpolating them matters)."""
    torch.manual_seed(seed)
    kwargs = {"input_shape": list(SHAPE), "widths": list(widths), "batchnorm": batchnorm}
    model = build_model("mlp", num_classes=ds.num_classes, **kwargs)
    with torch.no_grad():
        model.net[-1].weight.mul_(scale_last)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(seed + 1)
    meta = ck.make_meta(epoch=1, step=1, global_batch_size=8, world_size=1, seed=seed, train_config={},
                        data=ds.describe())
    return ck.save_checkpoint(ck.make_checkpoint("mlp", dict(kwargs, num_classes=ds.num_classes),
                                                 model.state_dict(), meta), path)


def free_port() -> int:
    """A TCP port on localhost that is free now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def killed_after_points(monkeypatch: Any, done: int, work: Callable[[], object]) -> None:
    """Run ``work`` as if killed after ``done`` grid points were written: the next ``GridWriter.write`` raises
    ``KeyboardInterrupt`` (what Ctrl-C does mid-sweep); the writer is restored afterwards."""
    from minima.files import results

    calls = {"n": 0}
    original = results.GridWriter.write

    def dying_write(self: Any, index: int, values: dict) -> None:
        if calls["n"] == done:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, index, values)

    monkeypatch.setattr(results.GridWriter, "write", dying_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            work()
    finally:
        monkeypatch.setattr(results.GridWriter, "write", original)


def rank_worker(rank: int, port: int, work: Callable[[Any], object], request: Any) -> None:
    """``work(request)`` as rank ``rank`` of a 2-process torchrun-like group on localhost (for ``mp.spawn``)."""
    import os

    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    work(request)


def plugin_free_mlp(num_classes: int = 10, **kwargs: Any) -> torch.nn.Module:
    """A user's import-path factory (``tests.helpers:plugin_free_mlp``), for the model-spec tests."""
    return build_model("mlp", num_classes, **kwargs)


def assert_drawn(png: Path, min_ink: float = 0.03, min_colours: int = 16) -> None:
    """``png`` is a drawn figure, not a blank or text-only canvas: at least ``min_ink`` of its pixels are not
    white and it holds at least ``min_colours`` distinct colours (lines, contours, anti-aliasing)."""
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(png)[..., :3]
    ink = float((img < 0.95).any(axis=-1).mean())
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink >= min_ink, f"{png}: only {ink:.1%} of the pixels are drawn"
    assert colours >= min_colours, f"{png}: only {colours} colours"


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class TinyResNet(torch.nn.Module):
    """A user's ResNet-style network: stem, ``blocks`` residual blocks on one stream, global pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8, blocks: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(num_classes: int = 10, **kwargs: Any) -> torch.nn.Module:
    """The import-path factory of :class:`TinyResNet` (``tests.helpers:tiny_resnet``)."""
    return TinyResNet(num_classes, **kwargs)


def logits_of_flat(model: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                        torch.Tensor]:
    """(θ ↦ the model's logits on ``x`` with its parameters taken from the flat vector θ, the current θ): for dense
    derivatives with ``torch.autograd.functional``."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def logits(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[offset:offset + s.numel()].view(s)
            offset += s.numel()
        return functional_call(model, params, (x,))

    return logits, torch.cat([p.detach().reshape(-1) for p in model.parameters()])
