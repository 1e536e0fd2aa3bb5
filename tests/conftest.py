"""Shared fixtures: tiny seeded data and models, and the real CIFAR-10 copy when MINIMA_DATA is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minima import data


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_data() -> data.Dataset:
    """120 train / 60 test samples of 3×4×4 images, 3 classes."""
    return data.synthetic(n_train=120, n_test=60, image_shape=(3, 4, 4), num_classes=3, seed=1)


@pytest.fixture
def real_npz() -> Path:
    path = os.environ.get(data.ENV_VAR)
    if not path or not Path(path).is_file() or Path(path).suffix != ".npz":
        pytest.skip(f"{data.ENV_VAR} does not point at an .npz copy of CIFAR-10")
    return Path(path)
