"""Data: what a data set is (:mod:`~minima.data.splits`), where it comes from (:mod:`~minima.data.sources`),
how batches are made from it (:mod:`~minima.data.transforms`) and where it lives (:mod:`~minima.data.placement`).
The names below are the public API (``from minima import data; data.load_cifar10()``)."""

from minima.data.placement import DeviceBatches, Placement, decide_placement, place
from minima.data.sources import (
    CIFAR10_CLASSES,
    DEFAULT_CACHE,
    ENV_VAR,
    NPZ_KEYS,
    TORCHVISION_SETS,
    check_fits_in_memory,
    load_cifar10,
    load_for_checkpoint,
    load_from_spec,
    load_imagefolder,
    load_npz,
    load_source,
    load_torchvision,
    load_torchvision_cifar10,
    rebuild,
    synthetic,
)
from minima.data.splits import DataError, Dataset, Split, stratified_subset, subset_chain
from minima.data.transforms import (
    augment,
    channel_stats,
    cutout,
    epoch_permutation,
    eval_batches,
    global_batches,
    normalize,
    shard,
)

__all__ = [
    "CIFAR10_CLASSES", "DEFAULT_CACHE", "ENV_VAR", "NPZ_KEYS", "TORCHVISION_SETS", "DataError", "Dataset",
    "DeviceBatches", "Placement", "Split", "augment", "channel_stats", "check_fits_in_memory", "cutout",
    "decide_placement", "epoch_permutation", "eval_batches", "global_batches", "load_cifar10", "load_for_checkpoint",
    "load_from_spec", "load_imagefolder", "load_npz", "load_source", "load_torchvision", "load_torchvision_cifar10",
    "normalize", "place", "rebuild", "shard", "stratified_subset", "subset_chain", "synthetic",
]
