"""What a data set is: splits held in memory as uint8 tensors, and stratified subsets with their provenance.

A :class:`Dataset` holds a train and a test :class:`Split` (images uint8 (N, C, H, W), labels int64), the
normalisation statistics of the *full* training split, the source spec it was loaded from, and the **chain** of
stratified subsets drawn since (``subsets = {"train": [{"n": 2000, "seed": 0}, {"n": 500, "seed": 0}]}``: a
500-image subset drawn from a 2,000-image subset). :func:`minima.data.sources.rebuild` turns
:meth:`Dataset.describe` back into exactly the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from minima.core.vocab import SubsetMode, check_choice


class DataError(ValueError):
    """A data source is missing, malformed, or inconsistent with what the caller asked for."""


@dataclass(frozen=True)
class Split:
    """One split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be a uint8 tensor (N, C, H, W); got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be int64 of shape ({self.images.shape[0]},); got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: torch.Tensor) -> Split:
        """The samples at ``indices`` (in that order)."""
        return Split(self.images[indices], self.labels[indices])

    def to(self, device: torch.device | str) -> Split:
        """The split on ``device`` (itself if it is there already)."""
        return Split(self.images.to(device), self.labels.to(device))

    def pin_memory(self) -> Split:
        """The split in page-locked host memory, so copies to a GPU can run asynchronously."""
        return Split(self.images.pin_memory(), self.labels.pin_memory())

    @property
    def nbytes(self) -> int:
        """Memory held by the images and labels, in bytes."""
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()


@dataclass(frozen=True)
class Dataset:
    """Train and test splits plus everything needed to reproduce how they were loaded.

    ``mean``/``std`` are per-channel statistics of the full training split in units of pixel/255.
    ``spec`` is a JSON-able description of the source (see :func:`minima.data.sources.load_from_spec`);
    ``subsets`` records, per split, the chain of stratified subsets taken with :meth:`subset`, in the order they
    were drawn: ``{"train": [{"n": 2000, "seed": 0}, {"n": 500, "seed": 1}], ...}``.
    """

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    spec: dict[str, Any]
    subsets: dict[str, list[dict[str, int]]] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0,
               mode: SubsetMode = "stratified") -> Dataset:
        """Deterministic subsets of the splits as they are now — class-stratified, or (``mode="first"``) the first n
        images in the split's order, as Cohen et al.'s ``cifar10-5k`` (``None``, or the split's own size, keeps a
        split whole; a larger size is a :class:`DataError` naming both, never a silent clamp); each subset drawn is
        appended to the split's chain in ``subsets`` (a ``first`` link records ``"mode": "first"``).

        Normalisation statistics are *not* recomputed: they stay those of the full training split.
        """
        check_choice("subset mode (--subset-mode)", mode, SubsetMode)
        out, subsets = self, {k: list(v) for k, v in self.subsets.items()}
        for name, n in (("train", train), ("test", test)):
            if n is None:
                continue
            split: Split = getattr(out, name)
            if n > len(split):
                drawn = f" (itself a subset: {' → '.join(str(link['n']) for link in subsets[name])})" \
                    if subsets.get(name) else ""
                raise DataError(f"asked for a {name} subset of {n} images but the {name} split has {len(split)}"
                                f"{drawn}; ask for at most {len(split)}, or omit --{name}-subset for all of them")
            if n == len(split):  # the whole split: no subset drawn, none recorded
                continue
            idx = stratified_subset(split.labels, n, seed) if mode == "stratified" else torch.arange(n)
            out = replace(out, **{name: split.take(idx)})
            link: dict[str, Any] = {"n": int(n), "seed": int(seed)}
            subsets[name] = [*subsets.get(name, []), link if mode == "stratified" else {**link, "mode": mode}]
        return replace(out, subsets=subsets)

    def apply_subsets(self, chain: dict[str, Any]) -> Dataset:
        """This data set with a recorded chain of subsets drawn again (``describe()["subset"]``; a single
        ``{"n", "seed"}`` per split, the record before chains, is a chain of one)."""
        out = self
        for name, links in subset_chain(chain).items():
            for link in links:
                out = out.subset(**{name: link["n"]}, seed=link["seed"], mode=link.get("mode", "stratified"))
        return out

    def describe(self) -> dict[str, Any]:
        """Metadata stored in checkpoints: source spec, subsets and normalisation (plain types only)."""
        return {
            "source": dict(self.spec),
            "subset": {k: [dict(link) for link in v] for k, v in self.subsets.items()},
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "num_classes": int(self.num_classes),
            "image_shape": list(self.image_shape),
            "train_size": len(self.train),
            "test_size": len(self.test),
        }


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` samples whose class proportions follow those of ``labels``.

    Each class gets ``floor(n · n_c / N)`` samples; the remainder goes to the classes with the largest
    fractional parts (ties to the lower class index). Within a class, samples are chosen by a seeded
    permutation, so the subset depends only on (labels, n, seed).
    """
    total = int(labels.shape[0])
    if not 0 < n <= total:
        raise DataError(f"subset size must be in 1..{total}; got {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.to(torch.float64) * n / total
    quota = exact.floor().to(torch.int64)
    remainder = n - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
    for i in order[:remainder]:
        quota[i] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls, as_tuple=True)[0]
        chosen.append(members[torch.randperm(len(members), generator=gen)[:q]])
    return torch.cat(chosen).sort().values



def subset_chain(recorded: dict[str, Any]) -> dict[str, list[dict[str, int]]]:
    """A recorded ``subset`` entry as chains: ``{split: [{"n", "seed"}, …]}`` (older files record one
    ``{"n", "seed"}`` per split)."""
    return {name: [dict(link) for link in (value if isinstance(value, list) else [value])]
            for name, value in recorded.items()}
