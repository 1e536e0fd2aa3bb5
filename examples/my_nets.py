"""A user's own model for minima: any importable function (or class) that returns an nn.Module giving logits.

    PYTHONPATH=examples python -m minima.train --model my_nets:small_cnn --model-kwargs '{"width": 32}' ...
"""

from torch import nn


def small_cnn(num_classes: int = 10, width: int = 32, in_channels: int = 3) -> nn.Module:
    """Two conv → BatchNorm → ReLU → max-pool blocks and a linear classifier; 32×32 inputs, logits out."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, num_classes),
    )
