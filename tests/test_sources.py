"""Your own models and data: torchvision data sets written offline in their own file formats, image folders,
torchvision and import-path models, the import allow-list, Keskar's CIFAR-100 networks."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minima import data, models
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.evaluate import check_model_accepts
from minima.interpolate import main as interpolate_main
from minima.plot import main as plot_main
from minima.sharpness import main as sharpness_main
from minima.surface import main as surface_main
from minima.train import main as train_main

from .helpers import assert_drawn

NETS = '''
from torch import nn


def make_net(num_classes=10, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, num_classes))


NOT_CALLABLE = 3


def returns_dict(num_classes=10):
    return {"logits": None}


class TupleNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x):
        return (self.fc(x.flatten(1)),)
'''


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module of model factories, importable as ``user_nets``."""
    (tmp_path / "user_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(models.TRUST_ENV, raising=False)
    sys.modules.pop("user_nets", None)
    return "user_nets"


# ------------------------------------------------------------------------------------------------ data
def _write_cifar100(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(np.arange(n) % 100)}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def _write_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        header = np.array([0x0803, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x0801, n], dtype=">i4").tobytes()
                                                          + labels.tobytes())


def test_torchvision_cifar100_from_its_own_file_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar100(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # our files, not the real md5
    ds = data.load_source("torchvision:CIFAR100", root=tmp_path)
    assert ds.num_classes == 100 and ds.train.images.shape == (40, 3, 32, 32) and len(ds.test) == 20
    assert ds.spec == {"kind": "torchvision", "name": "CIFAR100", "root": str(tmp_path.resolve())}
    assert ds.train.labels.tolist() == list(range(40))
    again = data.load_from_spec(ds.spec, download=False)  # what a checkpoint's spec reloads
    assert torch.equal(again.train.images, ds.train.images)


def test_torchvision_mnist_idx_files_give_one_channel(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    ds = data.load_source("torchvision:MNIST", root=tmp_path)
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10 and len(ds.train) == 30 and len(ds.mean) == 1
    with pytest.raises(data.DataError, match=r"unknown torchvision data set 'CIFAR1000'; choose one of"):
        data.load_source("torchvision:CIFAR1000", root=tmp_path)
    with pytest.raises(data.DataError, match="FashionMNIST could not be loaded .* copy torchvision's files"):
        data.load_torchvision("FashionMNIST", tmp_path / "empty", download=False)


def _write_imagefolder(root: Path, splits: tuple[str, ...] = ("train", "test"), size: tuple[int, int] = (8, 6)) -> None:
    rng = np.random.default_rng(2)
    for split in splits:
        for c, cls in enumerate(("cat", "dog", "emu")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                pixels[0, 0] = c  # a marker of the class
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_tree(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "pets")
    ds = data.load_source(f"imagefolder:{tmp_path / 'pets'}")
    assert ds.num_classes == 3 and ds.image_shape == (3, 6, 8) and len(ds.train) == 12 and len(ds.test) == 6
    assert ds.spec["classes"] == ["cat", "dog", "emu"]
    assert (ds.train.images[:, 0, 0, 0].long() == ds.train.labels).all()  # labels follow the folders
    _write_imagefolder(tmp_path / "noval", splits=("train",))
    with pytest.raises(data.DataError, match=r"needs the subfolders train/ and test/ \(or val/\)"):
        data.load_source(f"imagefolder:{tmp_path / 'noval'}")
    _write_imagefolder(tmp_path / "mixed")
    Image.new("RGB", (9, 9)).save(tmp_path / "mixed" / "test" / "dog" / "big.png")
    with pytest.raises(data.DataError, match="is 9×9 but .* is 8×6; give every image one size"):
        data.load_source(f"imagefolder:{tmp_path / 'mixed'}")
    with pytest.raises(data.DataError, match="unknown data source 'lmdb:x'"):
        data.load_source("lmdb:x")


def test_too_large_a_data_set_is_refused_naming_the_limit() -> None:
    with pytest.raises(data.DataError, match=r"needs .* GB as uint8 images in memory, more than 50% of the .* GB "
                                             r"available now \(the limit\)"):
        data.check_fits_in_memory(10**15, "this set")


# ---------------------------------------------------------------------------------------------- models
def test_keskar_cifar100_networks() -> None:
    assert models.count_parameters(models.build_model("c3", 100)) == 1_775_204
    assert models.count_parameters(models.build_model("c4", 100)) == 15_038_116
    assert models.model_info("c3").data == "torchvision:CIFAR100" and models.is_convolutional("c4")
    from experiments import keskar

    assert keskar.data_for("c3", keskar.load_preset("paper")) == "torchvision:CIFAR100"
    assert keskar.data_for("c1", keskar.load_preset("paper")) is None


def test_torchvision_models_by_name() -> None:
    model = models.build_model("torchvision:resnet18", 7)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 7) and models.is_convolutional(model)
    with pytest.raises(models.ModelSpecError, match="torchvision has no classification model 'resnt18'"):
        models.build_model("torchvision:resnt18")


def test_import_path_models_need_permission(nets: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(models.UntrustedImportError, match=f"pass --trust-import {nets}"):
        models.build_model(f"{nets}:make_net", 3)
    assert nets not in sys.modules  # refused before importing
    model = models.build_model(f"{nets}:make_net", 3, trusted=[nets], width=5)
    assert model[1].out_features == 5 and model[-1].out_features == 3
    monkeypatch.setenv(models.TRUST_ENV, f"other,{nets}")
    assert models.build_model(f"{nets}:make_net", 4)[-1].out_features == 4
    with pytest.raises(models.ModelSpecError, match="has no callable 'NOT_CALLABLE'"):
        models.build_model(f"{nets}:NOT_CALLABLE")
    with pytest.raises(models.ModelSpecError, match="returned a dict, not a torch.nn.Module"):
        models.build_model(f"{nets}:returns_dict")
    with pytest.raises(models.ModelSpecError, match="cannot import 'no_such_pkg.nets' .*is it installed"):
        models.build_model("no_such_pkg.nets:f", trusted=["no_such_pkg"])
    ds = data.synthetic(8, 4, (3, 32, 32), 3)
    with pytest.raises(ValueError, match=r"returned a tuple for 2 images; minima needs logits of shape"):
        check_model_accepts(models.build_model(f"{nets}:TupleNet", 3), ds)


def test_a_checkpoint_naming_os_system_is_never_imported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    meta = ck.make_meta(epoch=0, step=0, global_batch_size=1, world_size=1, seed=0, train_config={},
                        data=data.synthetic(8, 4, (3, 4, 4), 3).describe())
    evil = ck.save_checkpoint(ck.make_checkpoint("os:system", {"command": f"touch {marker}"}, {}, meta),
                              tmp_path / "evil.pt")
    loaded = ck.load_checkpoint(evil)  # reading is safe: weights_only, nothing imported
    with pytest.raises(ck.CheckpointError, match="would import the module 'os' .* --trust-import os"):
        ck.model_from_checkpoint(loaded)
    assert interpolate_main([str(evil), str(evil), "--out", str(tmp_path / "x.h5"), "--no-progress"]) == 2
    assert sharpness_main([str(evil), "--out", str(tmp_path / "y.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("--trust-import os") == 2 and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_your_own_model_trains_interpolates_measures_and_plots(nets: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """The README's worked example, in miniature: a factory from the user's module, end to end from the CLI."""
    common = ["--model", f"{nets}:make_net", "--model-kwargs", '{"width": 6}', "--data", "synthetic",
              "--train-subset", "256", "--test-subset", "64", "--epochs", "2", "--no-progress"]
    assert train_main([*common, "--batch-size", "32", "--out", str(tmp_path / "sb")]) == 0
    assert train_main([*common, "--batch-size", "128", "--out", str(tmp_path / "lb")]) == 0
    stored = ck.load_checkpoint(tmp_path / "sb" / "final.pt")
    assert stored["format"] == "minima.checkpoint/2" and stored["model"] == {
        "name": f"{nets}:make_net", "kwargs": {"width": 6, "num_classes": 10}}
    sb, lb, curve = tmp_path / "sb" / "final.pt", tmp_path / "lb" / "final.pt", tmp_path / "c.h5"
    assert interpolate_main([str(sb), str(lb), "--alphas", "-1:2:4", "--out", str(curve), "--no-progress"]) == 2
    assert f"--trust-import {nets}" in capsys.readouterr().err  # analysis commands ask for permission
    trust = ["--trust-import", nets]
    assert interpolate_main([str(sb), str(lb), "--alphas", "-1:2:4", "--out", str(curve), "--no-progress",
                             *trust]) == 0
    assert results.load_curve(curve).complete
    assert sharpness_main([str(sb), str(lb), "--metrics", "hessian", "--topk", "1", "--out",
                           str(tmp_path / "s.h5"), *trust]) == 0
    assert {r["checkpoint_label"] for r in results.load_sharpness(tmp_path / "s.h5")} == {"sb", "lb"}
    assert surface_main([str(sb), "--x", "-1:1:3", "--y", "-1:1:3", "--out", str(tmp_path / "p.h5"),
                         "--no-progress", *trust]) == 0
    assert plot_main([str(curve)]) == 0
    assert_drawn(curve.with_suffix(".png"))


@pytest.mark.slow
def test_keskar_pipeline_with_c3_on_cifar100_and_with_your_own_model(nets: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    from experiments import keskar

    _write_cifar100(tmp_path / "tv", n_train=600, n_test=128)  # the smoke preset's subsets: 512 / 128
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    out = tmp_path / "c3"
    assert keskar.main(["--model", "c3", "--preset", "smoke", "--data", "torchvision:CIFAR100", "--data-root",
                        str(tmp_path / "tv"), "--out", str(out)]) == 0
    meta = ck.load_checkpoint(out / "seed0" / "lb" / "final.pt")["meta"]
    assert meta["data"]["num_classes"] == 100 and meta["model_info"] == {
        "input_shape": [3, 32, 32], "num_classes": 100, "convolutional": True}
    table = keskar.parse_summary_table((out / "summary.md").read_text())
    assert table["test accuracy (%)"][2:] == ["—", "—"]  # no C3 figures in REFERENCE.md
    assert results.load_curve(out / "seed0" / "sb_vs_lb.h5").complete
    own = tmp_path / "own"
    assert keskar.main(["--model", f"{nets}:make_net", "--preset", "smoke", "--out", str(own)]) == 0
    assert_drawn(own / f"keskar_{nets}-make_net.png")


def test_torchvision_svhn_mat_files_and_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SVHN's .mat files (X as H×W×C×N, labels 1..10 with 10 meaning 0) and FashionMNIST's idx files, offline."""
    import scipy.io
    import torchvision.datasets.svhn as tv_svhn

    rng = np.random.default_rng(3)
    for split, n in (("train", 20), ("test", 10)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1)[:, None]  # SVHN writes the digit 0 as class 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_svhn.SVHN, "_check_integrity", lambda self: True)  # our files, not the real md5
    monkeypatch.setattr(tv_utils, "check_integrity", lambda *args, **kwargs: True)  # so its download finds them
    ds = data.load_source("torchvision:SVHN", root=tmp_path)
    assert ds.image_shape == (3, 32, 32) and len(ds.train) == 20 and ds.num_classes == 10
    assert ds.train.labels.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    first = scipy.io.loadmat(tmp_path / "train_32x32.mat")["X"][:, :, :, 0]  # H, W, C of image 0
    assert torch.equal(ds.train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    fashion = tmp_path / "fashion"
    _write_mnist(fashion)
    (fashion / "MNIST").rename(fashion / "FashionMNIST")
    ds = data.load_source("torchvision:FashionMNIST", root=fashion)
    assert ds.image_shape == (1, 28, 28) and ds.spec["name"] == "FashionMNIST"
