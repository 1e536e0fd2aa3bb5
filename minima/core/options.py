"""The settings every request that reads data shares — one declaration, one spelling, one help text.

:class:`DataOptions` is the base of training (:class:`minima.studies.train.TrainConfig`); :class:`CheckpointData`
adds what a command that reads checkpoints needs (the import allow-list) and is the base of the grid commands'
:class:`minima.studies.grid.EvalOptions` and of the measurement request (:mod:`minima.studies.sharpness`). A command
redeclares a field only to give it another default (training's ``float32_math`` is PyTorch's own flags).
"""

from __future__ import annotations

from dataclasses import dataclass

from minima.core.config import setting
from minima.core.vocab import DeviceName, Float32Math, SubsetMode

DATA_HELP = (
    "data: synthetic[:N_TRAIN[/N_TEST]], torchvision:NAME, imagefolder:PATH, npz:PATH or a path (.npz file or CIFAR-10 "
    "directory)")


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Which images, on which device, in which float32 math, in which evaluation batches."""

    data: str | None = setting(None, DATA_HELP, default_text="the data recorded in the (first) checkpoint")
    data_root: str | None = setting(None, "directory of torchvision data sets", default_text="~/.cache/minima")
    train_subset: int | None = setting(None, "stratified training subset (drawn from the data as recorded or "
                                       "given; the chain of subsets is recorded)", unit="samples", default_text="all")
    test_subset: int | None = setting(None, "stratified test subset", unit="samples", default_text="all")
    subset_seed: int = setting(0, "seed of the stratified subsets")
    subset_mode: SubsetMode = setting("stratified", "how --train-subset/--test-subset pick images: class-stratified "
                                      "(seeded), or the first N of the split (Cohen et al.'s cifar10-5k); either way "
                                      "normalised with the full training split's statistics")
    device: DeviceName = setting("auto", "compute device")
    float32_math: Float32Math = setting("fp32", "float32 matmuls/convolutions on CUDA: fp32 (TF32 off), tf32 or "
                                        "default (PyTorch's flags); recorded in every output")
    eval_batch_size: int = setting(1000, "evaluation batch size", unit="samples")


@dataclass(frozen=True, kw_only=True)
class CheckpointData(DataOptions):
    """:class:`DataOptions` of a command that reads checkpoints: also which modules a checkpoint's import-path
    model may be imported from."""

    trust_import: tuple[str, ...] = setting((), "modules a checkpoint's import-path model may be imported from "
                                            "(package.module; also $MINIMA_TRUSTED_IMPORTS)", default_text="none")
