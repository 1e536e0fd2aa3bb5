from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from minima.files import checkpoint as ck
from minima.models import build_model

MLP_KW = {"input_shape": [3, 4, 4], "widths": [6], "batchnorm": True}


def _ckpt(seed: int = 0, **model_kw: object) -> dict:
    torch.manual_seed(seed)
    kw = dict(MLP_KW, **model_kw)
    model = build_model("mlp", num_classes=3, **kw)
    meta = ck.make_meta(epoch=1, step=10, global_batch_size=8, world_size=1, seed=seed,
                        train_config={"lr": 1e-3}, data={"source": {"kind": "synthetic"}})
    return ck.make_checkpoint("mlp", dict(kw, num_classes=3), model.state_dict(), meta,
                              optimizer={"state": {}, "param_groups": []})


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    ckpt = _ckpt()
    path = ck.save_checkpoint(ckpt, tmp_path / "a.pt")
    loaded = ck.load_checkpoint(path)
    assert loaded["format"] == ck.FORMAT and loaded["meta"] == ckpt["meta"]
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v) and loaded["state_dict"][k].dtype == v.dtype
    # a plain weights_only load works too: nothing but tensors and plain values inside
    assert torch.load(path, weights_only=True)["model"]["name"] == "mlp"
    model, meta = ck.load_model(path)
    assert not model.training and meta["step"] == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    ck.save_checkpoint(_ckpt(seed=0), path)
    before = path.read_bytes()

    def dying_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(_ckpt(seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_save_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.save_checkpoint(_ckpt(), tmp_path / "missing" / "a.pt")


class _Evil:
    pass


def test_bad_files_raise_the_intended_errors(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "none.pt")
    for name, content in (("notes.pt", "hello, I am a text file"), ("config.pt", '{"lr": 0.1}\n'),
                          ("preset.pt", 'model = "c1"\n'), ("readme.pt", "# Title\n\ntext\n"), ("empty.pt", "")):
        (tmp_path / name).write_text(content)
        kind = "an empty file" if not content else "a text file"
        with pytest.raises(ck.CheckpointError, match=f"not a PyTorch checkpoint \\({kind}") as info:
            ck.load_checkpoint(tmp_path / name)
        assert not isinstance(info.value, ck.UnsafeCheckpointError)  # nothing pickled about a text file
    (tmp_path / "binary.pt").write_bytes(bytes(range(256)))
    with pytest.raises(ck.CheckpointError, match=r"not a PyTorch checkpoint \(not a PyTorch file"):
        ck.load_checkpoint(tmp_path / "binary.pt")
    good = ck.save_checkpoint(_ckpt(), tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(truncated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ck.FORMAT, "payload": _Evil()}, pickled)
    with pytest.raises(ck.UnsafeCheckpointError, match="pickled Python objects"):
        ck.load_checkpoint(pickled)
    bare = tmp_path / "bare.pt"
    torch.save(collections.OrderedDict(w=torch.ones(2)), bare)
    with pytest.raises(ck.CheckpointError, match="bare state_dict"):
        ck.load_checkpoint(bare)
    future = tmp_path / "future.pt"
    torch.save(dict(_ckpt(), format="minima.checkpoint/9"), future)
    with pytest.raises(ck.CheckpointError, match="upgrade minima"):
        ck.load_checkpoint(future)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "other/1"}, foreign)
    with pytest.raises(ck.CheckpointError, match="expected 'minima.checkpoint/2'"):
        ck.load_checkpoint(foreign)


def test_check_compatible_lists_differences() -> None:
    ck.check_compatible(_ckpt(0), _ckpt(1))
    with pytest.raises(ck.IncompatibleCheckpointsError) as info:
        ck.check_compatible(_ckpt(0), _ckpt(0, widths=[5]), "sb.pt", "lb.pt")
    msg = str(info.value)
    assert "model kwargs" in msg and "net.1.weight: shape (6, 48) vs (5, 48)" in msg
    other = _ckpt(0, batchnorm=False)
    with pytest.raises(ck.IncompatibleCheckpointsError, match=r"keys only in A: \['net.2.bias'"):
        ck.check_compatible(_ckpt(0), other)
    half = _ckpt(1)
    half["state_dict"] = {k: v.double() if v.is_floating_point() else v
                          for k, v in half["state_dict"].items()}
    with pytest.raises(ck.IncompatibleCheckpointsError, match="dtype torch.float32 vs torch.float64"):
        ck.check_compatible(_ckpt(0), half)


def test_make_checkpoint_requires_meta() -> None:
    with pytest.raises(ValueError, match="make_meta"):
        ck.make_checkpoint("mlp", {}, {}, {"epoch": 0})


def test_sha256(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert ck.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_result_file_given_as_a_checkpoint_is_named_as_one(tmp_path: Path) -> None:
    """Issue 30: an .h5 result file where a checkpoint belongs says so, and what to pass — a curve's curve.pt for
    ``minima.curve --evaluate``."""
    import h5py

    h5 = tmp_path / "curve.h5"
    with h5py.File(h5, "w") as f:
        f.attrs["format"] = "minima.grid/1"
    with pytest.raises(ck.CheckpointError, match="HDF5 result file, not a checkpoint; pass a .pt file written by"):
        ck.load_checkpoint(h5)
    with pytest.raises(ck.CheckpointError, match="pass a curve.pt written by python -m minima.curve"):
        ck.load_curve_checkpoint(h5)
