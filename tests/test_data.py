from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from minima import data


def _write_npz(path: Path, **overrides: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8),
        "train_y": np.arange(20, dtype=np.int64) % 10,
        "test_x": rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8),
        "test_y": np.arange(10, dtype=np.int64),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_loads_nhwc_as_nchw(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "ok.npz")
    ds = data.load_npz(path)
    raw = np.load(path)
    assert ds.train.images.shape == (20, 3, 4, 4) and ds.test.images.shape == (10, 3, 4, 4)
    np.testing.assert_array_equal(ds.train.images.permute(0, 2, 3, 1).numpy(), raw["train_x"])
    np.testing.assert_array_equal(ds.test.labels.numpy(), raw["test_y"])
    assert ds.spec == {"kind": "npz", "path": str(path.resolve())}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"test_y": None}, "lacks key"),
        ({"train_x": np.zeros((20, 4, 4, 3), dtype=np.float32)}, "dtype float32; expected uint8"),
        ({"train_x": np.zeros((20, 4, 4), dtype=np.uint8)}, "expected (N, H, W, C)"),
        ({"train_y": np.arange(19, dtype=np.int64) % 10}, "expected (20,)"),
        ({"test_y": np.arange(10, dtype=np.int64) + 1}, "labels in 1..10"),
        ({"train_y": np.zeros(20, dtype=np.float64)}, "expected integer class labels"),
        ({"test_x": np.zeros((10, 5, 5, 3), dtype=np.uint8)}, "differ in shape"),
    ],
)
def test_npz_validation_errors(tmp_path: Path, overrides: dict, message: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_npz(path)


def test_npz_missing_and_pickled_files(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_npz(tmp_path / "nope.npz")
    obj = tmp_path / "obj.npz"
    np.savez(obj, train_x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(data.DataError, match="pickled"):
        data.load_npz(obj)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(data.DataError, match="not a readable"):
        data.load_npz(junk)


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _write_npz(tmp_path / "env.npz")
    arg_file = _write_npz(tmp_path / "arg.npz", train_x=np.full((20, 4, 4, 3), 7, dtype=np.uint8))
    monkeypatch.setenv(data.ENV_VAR, str(env_file))
    assert data.load_cifar10().spec["path"] == str(env_file.resolve())
    assert data.load_cifar10(arg_file).spec["path"] == str(arg_file.resolve())


def test_torchvision_source_is_used_and_errors_explain_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No download here: an empty root with download=False is what an offline machine sees.
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataError, match=data.ENV_VAR):
        data.load_torchvision_cifar10(tmp_path, download=False)

    # The conversion from torchvision's CIFAR10 object (NHWC numpy + list targets) to our tensors.
    rng = np.random.default_rng(3)

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 30 if train else 10
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = data.load_cifar10(tmp_path)  # a directory means "torchvision root"
    assert ds.spec["kind"] == "torchvision"
    assert ds.train.images.shape == (30, 3, 32, 32) and ds.test.labels.tolist() == list(range(10))


def test_stratified_subset_is_balanced_deterministic_and_sorted() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = data.stratified_subset(labels, 10, seed=3)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [5, 3, 2]
    assert torch.equal(idx, data.stratified_subset(labels, 10, seed=3))
    assert not torch.equal(idx, data.stratified_subset(labels, 10, seed=4))
    # remainders go to the largest fractional parts: 7 of (50,30,20) → 3.5, 2.1, 1.4 → 4, 2, 1
    assert torch.bincount(labels[data.stratified_subset(labels, 7, 0)], minlength=3).tolist() == [4, 2, 1]
    with pytest.raises(data.DataError, match="subset size"):
        data.stratified_subset(labels, 0, 0)


def test_dataset_subset_keeps_full_split_normalisation(tiny_data: data.Dataset) -> None:
    sub = tiny_data.subset(train=30, test=12, seed=5)
    assert len(sub.train) == 30 and len(sub.test) == 12
    assert sub.mean == tiny_data.mean and sub.std == tiny_data.std
    assert sub.describe()["subset"] == {"train": [{"n": 30, "seed": 5}], "test": [{"n": 12, "seed": 5}]}
    nested = sub.subset(train=10, seed=2)  # a subset of the subset: the chain records both, in order
    assert nested.describe()["subset"]["train"] == [{"n": 30, "seed": 5}, {"n": 10, "seed": 2}]
    again = tiny_data.apply_subsets(nested.describe()["subset"])
    assert torch.equal(again.train.images, nested.train.images) and torch.equal(again.test.images, nested.test.images)
    # the record before chains (one {"n", "seed"} per split) is a chain of one
    assert torch.equal(tiny_data.apply_subsets({"train": {"n": 30, "seed": 5}}).train.images, sub.train.images)


@pytest.mark.parametrize(("n", "world"), [(10, 3), (7, 7), (3, 4), (100, 8), (0, 2)])
def test_shards_are_disjoint_and_cover(n: int, world: int) -> None:
    perm = data.epoch_permutation(n, seed=1, epoch=2)
    parts = [data.shard(perm, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), perm)  # disjoint, covering, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_epoch_permutations_are_seeded_per_epoch() -> None:
    a = data.epoch_permutation(50, seed=0, epoch=0)
    assert torch.equal(a, data.epoch_permutation(50, seed=0, epoch=0))
    assert not torch.equal(a, data.epoch_permutation(50, seed=0, epoch=1))
    assert torch.equal(a.sort().values, torch.arange(50))


def test_global_batches_drop_incomplete_tail() -> None:
    batches = data.global_batches(torch.arange(23), 5)
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert torch.equal(torch.cat(batches), torch.arange(20))


def test_augment_shapes_reproducible_and_each_output_is_a_crop_or_its_flip() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8, generator=gen)
    out1 = data.augment(x, torch.Generator().manual_seed(7), pad=2)
    out2 = data.augment(x, torch.Generator().manual_seed(7), pad=2)
    assert out1.shape == x.shape and out1.dtype == torch.uint8
    assert torch.equal(out1, out2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out1[i], c) for c in candidates)
    # no padding and no flip is the identity
    assert torch.equal(data.augment(x, torch.Generator().manual_seed(1), pad=0, flip=False), x)


def test_normalisation_statistics(tiny_data: data.Dataset) -> None:
    imgs = tiny_data.train.images.to(torch.float64) / 255
    np.testing.assert_allclose(tiny_data.mean, imgs.mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(tiny_data.std, imgs.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-12)
    z = data.normalize(tiny_data.train.images, tiny_data.mean, tiny_data.std, dtype=torch.float64)
    np.testing.assert_allclose(z.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, rtol=1e-12)
    zc = data.normalize(tiny_data.train.images, tiny_data.mean, tiny_data.std, channels_last=True)
    assert zc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(zc, z.float(), rtol=1e-6, atol=1e-6)


def test_synthetic_is_deterministic_and_validated() -> None:
    a = data.synthetic(40, 20, (1, 3, 3), num_classes=4, seed=9)
    b = data.load_from_spec(a.spec)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert set(a.train.labels.tolist()) == {0, 1, 2, 3}
    with pytest.raises(data.DataError, match="image_shape"):
        data.synthetic(image_shape=(3, 4))


def test_synthetic_sizes_come_from_the_source_never_from_a_subset() -> None:
    assert (len(data.load_source("synthetic").train), len(data.load_source("synthetic").test)) == (2048, 512)
    ds = data.load_source("synthetic:300/40")
    assert (len(ds.train), len(ds.test)) == (300, 40) and len(data.load_source("synthetic:300").test) == 512
    part = ds.subset(100, 20, seed=0)  # a subset is drawn from the data, as from CIFAR-10
    assert len(part.train) == 100 and part.describe()["source"]["n_train"] == 300
    assert torch.equal(data.rebuild(part.describe()).train.images, part.train.images)
    with pytest.raises(data.DataError, match="the train split has 300"):
        ds.subset(301, None, seed=0)
    for bad in ("synthetic:0", "synthetic:many", "synthetic:10/-1"):
        with pytest.raises(data.DataError, match="synthetic:N_TRAIN/N_TEST"):
            data.load_source(bad)


def test_eval_batches_fixed_order(tiny_data: data.Dataset) -> None:
    got = list(data.eval_batches(tiny_data.test, 25))
    assert [len(y) for _, y in got] == [25, 25, 10]
    assert torch.equal(torch.cat([y for _, y in got]), tiny_data.test.labels)


def test_real_cifar10_npz(real_npz: Path) -> None:
    ds = data.load_npz(real_npz)
    assert len(ds.train) == 50_000 and len(ds.test) == 10_000
    assert ds.image_shape == (3, 32, 32) and ds.num_classes == 10
    np.testing.assert_allclose(ds.mean, (0.4913, 0.4821, 0.4465), atol=2e-4)
    np.testing.assert_allclose(ds.std, (0.2452, 0.2428, 0.2606), atol=2e-4)
    assert torch.bincount(ds.train.labels).tolist() == [5000] * 10


def test_first_n_subsets_are_the_first_images_recorded_and_rebuilt() -> None:
    ds = data.synthetic(n_train=200, n_test=50, image_shape=(3, 4, 4), num_classes=5, seed=3)
    first = ds.subset(train=60, test=20, mode="first")
    assert torch.equal(first.train.images, ds.train.images[:60]) and torch.equal(first.test.labels, ds.test.labels[:20])
    assert first.mean == ds.mean and first.std == ds.std  # standardised with the full training split's statistics
    assert first.describe()["subset"] == {"train": [{"n": 60, "seed": 0, "mode": "first"}],
                                          "test": [{"n": 20, "seed": 0, "mode": "first"}]}
    again = ds.apply_subsets(first.describe()["subset"])
    assert torch.equal(again.train.images, first.train.images) and again.subsets == first.subsets
    # a stratified subset of the first 60 is a chain of two links, replayed in order
    chain = first.subset(train=30, seed=2)
    assert torch.equal(ds.apply_subsets(chain.describe()["subset"]).train.images, chain.train.images)
    with pytest.raises(ValueError, match=r"unknown subset mode \(--subset-mode\) 'last'"):
        ds.subset(train=10, mode="last")
