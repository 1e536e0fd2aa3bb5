"""Data sources: every kind of data set a ``--data`` flag or a recorded spec names, loaded as uint8 tensors.

Three sources share one API (:class:`Dataset`):

* torchvision's ``CIFAR10`` (downloaded once into a cache directory),
* an ``.npz`` array file with ``train_x``, ``train_y``, ``test_x``, ``test_y`` (NHWC uint8, as in
  ``shared/data/cifar10.npz``),
* a seeded synthetic classification problem for tests (any image shape, any number of classes).

Images are kept as one ``uint8`` tensor of shape (N, C, H, W) per split. Normalisation uses the
per-channel mean and standard deviation of the *full* training split (in units of pixel/255), is
applied per batch by :func:`minima.data.transforms.normalize`, and is recorded in every checkpoint
(:meth:`Dataset.describe`) so a later evaluation uses exactly the statistics the model was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima.core.allocator import available_memory_bytes
from minima.core.vocab import SubsetMode
from minima.data.splits import DataError, Dataset, Split
from minima.data.transforms import channel_stats

ENV_VAR = "MINIMA_DATA"
DEFAULT_CACHE = Path("~/.cache/minima").expanduser()
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")


# ------------------------------------------------------------------------------------------ sources
def _dataset_from_arrays(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    num_classes: int, spec: dict[str, Any],
) -> Dataset:
    train, test = Split(train_x, train_y), Split(test_x, test_y)
    mean, std = channel_stats(train.images)
    return Dataset(train=train, test=test, num_classes=num_classes, mean=mean, std=std, spec=spec)


def _nhwc_to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def load_npz(path: str | os.PathLike[str], num_classes: int | None = None) -> Dataset:
    """Load an ``.npz`` file with ``train_x``/``test_x`` (N, H, W, C) uint8 and ``train_y``/``test_y``
    (N,) integer labels in ``0..num_classes−1`` (default: the largest training label + 1, at least 2). Every
    problem is reported with the key and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass the path of an .npz file with keys "
                        f"{', '.join(NPZ_KEYS)} (for example ../shared/data/cifar10.npz)")
    try:
        # allow_pickle=False: an array file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz array file ({exc}); it may be corrupt, or an "
                        "object-array (pickled) file, which is refused") from exc
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks key(s) {missing}; expected {list(NPZ_KEYS)}, found {sorted(arrays)}")
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8:
            raise DataError(f"{path}: {split}_x has dtype {x.dtype}; expected uint8 pixels 0..255")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(f"{path}: {split}_x has shape {x.shape}; expected (N, H, W, C) with C in (1, 3)")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: {split}_y has dtype {y.dtype}; expected integer class labels")
        if y.shape != (x.shape[0],):
            raise DataError(f"{path}: {split}_y has shape {y.shape}; expected ({x.shape[0]},) to match "
                            f"{split}_x")
        if y.size and y.min() < 0:
            raise DataError(f"{path}: {split}_y has negative labels; expected class indices 0, 1, …")
    if num_classes is None:
        num_classes = max(2, int(arrays["train_y"].max(initial=0)) + 1)  # the training labels define the classes
    for split in ("train", "test"):
        y = arrays[f"{split}_y"]
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{path}: {split}_y has labels in {y.min()}..{y.max()}; expected "
                            f"0..{num_classes - 1}")
    if arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"{path}: train images {arrays['train_x'].shape[1:]} and test images "
                        f"{arrays['test_x'].shape[1:]} differ in shape")
    return _dataset_from_arrays(
        _nhwc_to_tensor(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64)),
        _nhwc_to_tensor(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes, {"kind": "npz", "path": str(path.resolve())},
    )


#: The torchvision data sets minima loads by name, with their class counts.
TORCHVISION_SETS: dict[str, int] = {"CIFAR10": 10, "CIFAR100": 100, "MNIST": 10, "FashionMNIST": 10, "SVHN": 10}


def _torchvision_split(name: str, dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) images and int64 labels of a torchvision data set object, whatever its layout."""
    images = np.asarray(dataset.data.numpy() if isinstance(dataset.data, torch.Tensor) else dataset.data,
                        dtype=np.uint8)
    labels = dataset.labels if name == "SVHN" else dataset.targets
    if images.ndim == 3:  # MNIST, FashionMNIST: (N, H, W) grey
        tensor = torch.from_numpy(np.ascontiguousarray(images[:, None]))
    elif name == "SVHN":  # already (N, C, H, W)
        tensor = torch.from_numpy(np.ascontiguousarray(images))
    else:
        tensor = _nhwc_to_tensor(images)
    return tensor, torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def load_torchvision(name: str = "CIFAR10", root: str | os.PathLike[str] = DEFAULT_CACHE,
                     download: bool = True) -> Dataset:
    """A torchvision classification data set (:data:`TORCHVISION_SETS`) through its own class — the standard
    download into ``root`` on first use — materialised as uint8 tensors."""
    if name not in TORCHVISION_SETS:
        raise DataError(f"unknown torchvision data set {name!r}; choose one of {list(TORCHVISION_SETS)}")
    import torchvision.datasets as tvd  # imported lazily: tests and .npz users never need it

    cls = getattr(tvd, name)
    root = Path(root).expanduser()
    try:
        if name == "SVHN":
            parts = [cls(str(root), split=s, download=download) for s in ("train", "test")]
        else:
            parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    except (RuntimeError, OSError) as exc:  # URLError is an OSError; a missing copy is a RuntimeError
        hint = (f"set {ENV_VAR}=/path/to/cifar10.npz (the format of shared/data/cifar10.npz), or pass --data PATH "
                "(an .npz file or a directory holding torchvision's cifar-10-batches-py)" if name == "CIFAR10"
                else f"copy torchvision's files for {name} into {root} (or pass --data-root DIR where they are)")
        raise DataError(f"{name} could not be loaded from or downloaded into {root} ({exc}). On a machine "
                        f"without internet, {hint}.") from exc
    (train_x, train_y), (test_x, test_y) = (_torchvision_split(name, p) for p in parts)
    check_fits_in_memory(train_x.numel() + test_x.numel(), f"torchvision {name}")
    return _dataset_from_arrays(train_x, train_y, test_x, test_y, TORCHVISION_SETS[name],
                                {"kind": "torchvision", "name": name, "root": str(root.resolve())})


def load_torchvision_cifar10(root: str | os.PathLike[str] = DEFAULT_CACHE, download: bool = True) -> Dataset:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (downloaded into ``root`` on first use)."""
    return load_torchvision("CIFAR10", root, download)


def check_fits_in_memory(nbytes: int, what: str, share: float = 0.5) -> None:
    """Refuse a data set whose uint8 images would take more than ``share`` of the memory available now
    (minima keeps data in memory; streaming from disk is not supported)."""
    available = available_memory_bytes(torch.device("cpu"))
    if available is not None and nbytes > share * available:
        raise DataError(f"{what} needs {nbytes / 1e9:.1f} GB as uint8 images in memory, more than "
                        f"{share:.0%} of the {available / 1e9:.1f} GB available now (the limit); minima keeps data "
                        "in memory and does not stream it — use a smaller data set or smaller images")


def load_imagefolder(path: str | os.PathLike[str]) -> Dataset:
    """An image-folder tree as torchvision's ``ImageFolder`` reads it: ``PATH/train/<class>/<image>`` and
    ``PATH/test/<class>/<image>`` (or ``val/``); classes are the train folder's subfolder names, sorted; every
    image is decoded to RGB and must have one size (resize them beforehand)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(path).expanduser()
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root} is not an image-folder data set: it needs the subfolders train/ and test/ (or val/), "
                        "each holding one folder of images per class (train/cat/1.png, test/cat/7.png, …)")
    try:
        train_set, test_set = ImageFolder(str(train_dir)), ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: {exc}") from exc
    unknown = sorted(set(test_set.classes) - set(train_set.classes))
    if unknown:
        raise DataError(f"{test_dir} has classes that {train_dir} lacks: {unknown}")
    index = {c: i for i, c in enumerate(train_set.classes)}
    first = Image.open(train_set.samples[0][0])
    width, height = first.size
    check_fits_in_memory(3 * width * height * (len(train_set) + len(test_set)), f"the image folder {root}")

    def read(folder: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.empty((len(folder), height, width, 3), dtype=np.uint8)
        for i, (file, _) in enumerate(folder.samples):
            with Image.open(file) as img:
                rgb = img.convert("RGB")
                if rgb.size != (width, height):
                    raise DataError(f"{file} is {rgb.size[0]}×{rgb.size[1]} but {train_set.samples[0][0]} is "
                                    f"{width}×{height}; give every image one size (resize them beforehand)")
                images[i] = np.asarray(rgb)
        labels = [index[folder.classes[c]] for _, c in folder.samples]
        return _nhwc_to_tensor(images), torch.as_tensor(labels, dtype=torch.int64)

    (train_x, train_y), (test_x, test_y) = read(train_set), read(test_set)
    return _dataset_from_arrays(train_x, train_y, test_x, test_y, len(train_set.classes),
                                {"kind": "imagefolder", "path": str(root.resolve()), "classes": train_set.classes})


def synthetic(
    n_train: int = 512,
    n_test: int = 256,
    image_shape: Sequence[int] = (3, 8, 8),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 40.0,
) -> Dataset:
    """A seeded, learnable classification problem: each class is a random uint8 prototype image, each
    sample its prototype plus Gaussian pixel noise of std ``noise`` (pixel units), clipped to 0..255.

    Labels cycle through the classes in a shuffled order, so every class is present. The same arguments
    always give the same tensors (the spec is stored in checkpoints and regenerates the data).
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"image_shape must be (C, H, W) with positive sizes; got {image_shape}")
    if num_classes < 2:
        raise DataError(f"num_classes must be ≥ 2; got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=gen) * 255.0

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        x = prototypes[labels] + noise * torch.randn((n, *shape), generator=gen)
        return x.round().clamp(0, 255).to(torch.uint8), labels.to(torch.int64)

    tx, ty = make(n_train)
    vx, vy = make(n_test)
    spec = {"kind": "synthetic", "n_train": n_train, "n_test": n_test, "image_shape": list(shape),
            "num_classes": num_classes, "seed": seed, "noise": float(noise)}
    return _dataset_from_arrays(tx, ty, vx, vy, num_classes, spec)


def load_cifar10(source: str | os.PathLike[str] | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 from, in order of precedence: ``source`` (an ``.npz`` file or a torchvision root
    directory), the ``MINIMA_DATA`` environment variable (same meaning), or torchvision's download into
    ``~/.cache/minima``."""
    chosen = source if source is not None else os.environ.get(ENV_VAR) or None
    if chosen is None:
        return load_torchvision_cifar10(DEFAULT_CACHE, download=download)
    path = Path(chosen).expanduser()
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path)
    return load_torchvision_cifar10(path, download=download)


SYNTHETIC_SIZES = (2048, 512)  # training / test images of ``synthetic`` without sizes


def synthetic_sizes(source: str) -> tuple[int, int] | None:
    """``synthetic`` → (2048, 512), ``synthetic:N`` → (N, 512), ``synthetic:N/M`` → (N, M); None for another source.
    A ``DataError`` for sizes that are not positive whole numbers.

    >>> synthetic_sizes("synthetic:4096/1024"), synthetic_sizes("synthetic:300"), synthetic_sizes("cifar10")
    ((4096, 1024), (300, 512), None)
    """
    kind, sep, rest = source.partition(":")
    if kind != "synthetic":
        return None
    if not sep:
        return SYNTHETIC_SIZES
    train_text, _, test_text = rest.partition("/")
    try:
        sizes = int(train_text), int(test_text) if test_text else SYNTHETIC_SIZES[1]
    except ValueError:
        sizes = (0, 0)
    if min(sizes) < 1:
        raise DataError(f"data source {source!r}: write synthetic, synthetic:N_TRAIN or synthetic:N_TRAIN/N_TEST "
                        "with whole numbers ≥ 1, e.g. synthetic:4096/1024")
    return sizes


def load_source(source: str | None, root: str | os.PathLike[str] | None = None) -> Dataset:
    """The data set a ``--data`` flag names.

    * ``None``: CIFAR-10 from ``$MINIMA_DATA``, else torchvision's download (:func:`load_cifar10`);
    * ``synthetic``, ``synthetic:N_TRAIN`` or ``synthetic:N_TRAIN/N_TEST``: a seeded 3×32×32, 10-class problem of that
      many images (default 2048 / 512); a subset (``--train-subset``) is drawn from it like from any data set;
    * ``torchvision:NAME``: one of :data:`TORCHVISION_SETS` under ``root`` (default ``~/.cache/minima``);
    * ``imagefolder:PATH``: :func:`load_imagefolder`;  ``npz:PATH``: :func:`load_npz`;
    * a path: an ``.npz`` file or a directory holding torchvision's CIFAR-10 files."""
    sizes = synthetic_sizes(source) if source is not None else None
    if sizes is not None:
        return synthetic(n_train=sizes[0], n_test=sizes[1], image_shape=(3, 32, 32), num_classes=10)
    if source is not None and ":" in source and not Path(source).exists():
        kind, _, rest = source.partition(":")
        if kind == "torchvision":
            return load_torchvision(rest, DEFAULT_CACHE if root is None else root)
        if kind == "imagefolder":
            return load_imagefolder(rest)
        if kind == "npz":
            return load_npz(rest)
        raise DataError(f"unknown data source {source!r}; use synthetic[:N_TRAIN[/N_TEST]], torchvision:NAME, "
                        "imagefolder:PATH, "
                        "npz:PATH or a path (an .npz file or a CIFAR-10 directory)")
    return load_cifar10(source)


def load_from_spec(spec: dict[str, Any], download: bool = True) -> Dataset:
    """Reload the data a checkpoint was trained on from its stored ``source`` spec.

    An ``.npz`` or torchvision CIFAR-10 source whose recorded path no longer exists falls back to
    :func:`load_cifar10`'s resolution (``MINIMA_DATA``, then the download), and other torchvision sets to their
    download into ``~/.cache/minima``, so checkpoints stay usable when moved between machines.
    """
    kind = spec.get("kind")
    if kind == "synthetic":
        return synthetic(spec["n_train"], spec["n_test"], spec["image_shape"], spec["num_classes"],
                         spec["seed"], spec["noise"])
    if kind == "npz":
        path = Path(spec["path"])
        return load_npz(path) if path.is_file() else load_cifar10(download=download)
    if kind == "torchvision":
        name, root = spec.get("name", "CIFAR10"), Path(spec["root"])
        if name == "CIFAR10" and not root.is_dir():
            return load_cifar10(download=download)
        return load_torchvision(name, root if root.is_dir() else DEFAULT_CACHE, download)
    if kind == "imagefolder":
        return load_imagefolder(spec["path"])
    raise DataError(f"unknown data source kind {kind!r} in {spec}; expected 'npz', 'torchvision', 'imagefolder' or "
                    "'synthetic' (pass the data explicitly with --data)")


def rebuild(description: dict[str, Any], download: bool = True) -> Dataset:
    """Exactly the images an output was computed on, from its recorded data description
    (:meth:`Dataset.describe`: the source spec and the chain of subsets)."""
    return load_from_spec(description["source"], download=download).apply_subsets(description.get("subset", {}))


def load_for_checkpoint(recorded: dict[str, Any], data: str | None = None, train_subset: int | None = None,
                        test_subset: int | None = None, subset_seed: int = 0,
                        root: str | os.PathLike[str] | None = None, mode: SubsetMode = "stratified") -> Dataset:
    """The data a checkpoint was trained on — its ``meta["data"]`` (``recorded``: source spec and chain of
    subsets) — or the source ``data`` names if given, then optional further stratified subsets of
    ``train_subset`` / ``test_subset`` samples drawn with ``subset_seed`` from those (appended to the chain, so
    :func:`rebuild` of the result's ``describe()`` gives the same images). ``mode``: stratified subsets, or the
    first images of the split (``first``)."""
    ds = load_source(data, root=root) if data is not None else rebuild(recorded)
    if train_subset is not None:
        ds = ds.subset(train=train_subset, seed=subset_seed, mode=mode)
    if test_subset is not None:
        ds = ds.subset(test=test_subset, seed=subset_seed, mode=mode)
    return ds
