from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.func import functional_call

from minima import data
from minima.files import checkpoint as ck
from minima.files import results
from minima.geometry.directions import random_direction
from minima.interpolate import SweepRequest, interpolate, main, parse_alphas, run

from .helpers import assert_drawn, free_port, killed_after_points, rank_worker, toy_checkpoint, toy_dataset


def _req(a: Path, b: Path | None, out: Path, **kw: object) -> SweepRequest:
    base = dict(checkpoint_a=a, checkpoint_b=b, alphas="-1:2:5", out=out, device="cpu", plot=False,
                progress=False)
    base.update(kw)
    return SweepRequest(**base)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, data.Dataset]:
    ds = toy_dataset()
    return toy_checkpoint(tmp_path / "a.pt", 1, ds), toy_checkpoint(tmp_path / "b.pt", 2, ds), ds


@pytest.fixture
def bn_pair(tmp_path: Path) -> tuple[Path, Path, data.Dataset]:
    ds = toy_dataset()
    return (toy_checkpoint(tmp_path / "bna.pt", 1, ds, batchnorm=True),
            toy_checkpoint(tmp_path / "bnb.pt", 2, ds, batchnorm=True), ds)


def test_curve_equals_dense_float64_reference(pair: tuple[Path, Path, data.Dataset]) -> None:
    a_path, b_path, ds = pair
    model_a, _ = ck.load_model(a_path)
    model_b, _ = ck.load_model(b_path)
    alphas = np.array([-1.0, 0.0, 0.3, 1.0, 2.5])
    curve = interpolate(model_a.double(), model_b.double(), ds.train, ds.test, alphas, mean=ds.mean, std=ds.std,
                        dtype=torch.float64, batch_size=7)
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    for i, alpha in enumerate(alphas):
        params = {k: (1 - alpha) * pa[k].detach() + alpha * pb[k].detach() for k in pa}
        for split, loss, acc in ((ds.train, curve.train_loss, curve.train_accuracy),
                                 (ds.test, curve.test_loss, curve.test_accuracy)):
            x = data.normalize(split.images, ds.mean, ds.std, dtype=torch.float64)
            logits = functional_call(model_a, params, (x,))
            ref = (torch.logsumexp(logits, 1) - logits[torch.arange(len(split)), split.labels]).mean()
            assert loss[i] == pytest.approx(float(ref), rel=1e-12)
            assert acc[i] == pytest.approx(float((logits.argmax(1) == split.labels).double().mean()), abs=0)
    # the caller's models are untouched
    assert torch.equal(model_a.net[1].weight, ck.load_model(a_path)[0].net[1].weight.double())


def test_huge_logits_stay_finite(tmp_path: Path) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, scale_last=1e4)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, scale_last=1e4)
    out = run(_req(a, b, tmp_path / "big.h5", alphas="-1,0,1,2"))
    curve = results.load_curve(out)
    assert np.isfinite(curve.train_loss).all() and (curve.train_nonfinite == 0).all()
    assert curve.train_loss.max() > 100  # logits really are of order 1e4 here
    model, _ = ck.load_model(a)
    x = data.normalize(ds.test.images, ds.mean, ds.std)
    logits = model(x).detach().double()
    ref = (torch.logsumexp(logits, 1) - logits[torch.arange(len(ds.test)), ds.test.labels]).mean()
    assert curve.test_loss[1] == pytest.approx(float(ref), rel=1e-5)


def test_negative_variance_is_reported_and_recompute_is_exact(bn_pair: tuple, tmp_path: Path) -> None:
    a_path, b_path, ds = bn_pair
    for path, var in ((a_path, 4.0), (b_path, 1.0)):
        ckpt = ck.load_checkpoint(path)
        ckpt["state_dict"]["net.2.running_var"].fill_(var)
        ck.save_checkpoint(ckpt, path)
    # running_var(α) = (1 − α)·4 + α·1 < 0 for α > 4/3
    interp = results.load_curve(run(_req(a_path, b_path, tmp_path / "i.h5", alphas="0,1,1.5,2", bn="interpolate")))
    assert interp.negative_variance.tolist() == [0, 0, 6, 6]
    assert interp.test_nonfinite[3] == len(ds.test) and interp.test_nonfinite[0] == 0
    rec = results.load_curve(run(_req(a_path, b_path, tmp_path / "r.h5", alphas="0,1,1.5,2", bn="recompute",
                                      eval_batch_size=1000, dtype="float64")))
    assert np.isfinite(rec.test_loss).all() and (rec.test_nonfinite == 0).all()
    # direct re-estimation: θ(2) with BN statistics of the whole training set as one batch, float64
    ca, cb = ck.load_checkpoint(a_path), ck.load_checkpoint(b_path)
    model = ck.model_from_checkpoint(ca).double()
    model.load_state_dict({k: (-1.0 * v + 2.0 * cb["state_dict"][k]) if v.is_floating_point() else v
                           for k, v in ca["state_dict"].items()})
    bn = model.net[2]
    bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64))
        model.eval()
        logits = model(data.normalize(ds.test.images, ds.mean, ds.std, dtype=torch.float64))
    ref = (torch.logsumexp(logits, 1) - logits[torch.arange(len(ds.test)), ds.test.labels]).mean()
    assert rec.test_loss[3] == pytest.approx(float(ref), rel=1e-10)


def test_endpoint_check_with_interpolated_statistics(bn_pair: tuple, tmp_path: Path) -> None:
    a_path, b_path, _ = bn_pair
    out = run(_req(a_path, b_path, tmp_path / "e.h5", alphas="0:1:3", bn="interpolate"))
    attrs = results.load_curve(out).attrs
    assert attrs["endpoint_a_max_rel_diff"] <= 1e-5 and attrs["endpoint_b_max_rel_diff"] <= 1e-5
    assert attrs["bn_policy"] == "interpolate"


def test_resume_after_kill_matches_uninterrupted(bn_pair: tuple, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a_path, b_path, _ = bn_pair
    full = results.load_curve(run(_req(a_path, b_path, tmp_path / "full.h5")))
    killed_after_points(monkeypatch, 2, lambda: run(_req(a_path, b_path, tmp_path / "part.h5")))
    partial = results.load_curve(tmp_path / "part.h5")
    assert (partial.test_nonfinite >= 0).sum() == 2 and not partial.complete
    with pytest.raises(FileExistsError, match="partially computed.*--resume"):
        run(_req(a_path, b_path, tmp_path / "part.h5"))
    resumed = results.load_curve(run(_req(a_path, b_path, tmp_path / "part.h5", resume=True)))
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_nonfinite"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name))
    with pytest.raises(FileExistsError, match="is complete"):
        run(_req(a_path, b_path, tmp_path / "part.h5"))
    with pytest.raises(results.ResultsError, match="other checkpoints or settings.*bn: 'recompute' → 'batch'"):
        run(_req(a_path, b_path, tmp_path / "part.h5", resume=True, bn="batch"))
    with pytest.raises(results.ResultsError, match=r"eval_batch_size: 1000 → 7\)"):  # only that field named
        run(_req(a_path, b_path, tmp_path / "part.h5", resume=True, eval_batch_size=7))
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        run(_req(a_path, b_path, tmp_path / "part.h5", resume=True, overwrite=True))
    with pytest.raises(results.ResultsError, match="another grid"):
        run(_req(a_path, b_path, tmp_path / "part.h5", resume=True, alphas="0,1"))



@pytest.mark.slow
def test_two_rank_sweep_equals_one_rank(bn_pair: tuple, tmp_path: Path) -> None:
    a_path, b_path, _ = bn_pair
    one = results.load_curve(run(_req(a_path, b_path, tmp_path / "one.h5")))
    mp.spawn(rank_worker, args=(free_port(), run, _req(a_path, b_path, tmp_path / "two.h5")), nprocs=2,
             join=True)
    two = results.load_curve(tmp_path / "two.h5")
    # float32 with 1 thread per rank vs 2 threads: equal up to summation order
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-6)
    for name in ("train_accuracy", "test_accuracy", "negative_variance", "test_nonfinite"):
        np.testing.assert_array_equal(getattr(two, name), getattr(one, name))


def test_random_direction_is_filter_normalised(pair: tuple, tmp_path: Path) -> None:
    a_path, _, _ = pair
    model, _ = ck.load_model(a_path)
    state = model.state_dict()
    d = random_direction(model, state, seed=3)
    w = state["net.1.weight"].double()
    torch.testing.assert_close(d["net.1.weight"].norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
    assert torch.count_nonzero(d["net.1.bias"]) == 0
    curve = results.load_curve(run(_req(a_path, None, tmp_path / "rand.h5", direction="random", alphas="-1,0,1")))
    direct = results.load_curve(run(_req(a_path, a_path, tmp_path / "self.h5", alphas="0")))
    assert curve.test_loss[1] == pytest.approx(direct.test_loss[0], rel=1e-12)
    assert curve.attrs["checkpoint_b"] == "" and "random" in curve.name_b


def test_negative_grid_on_the_command_line() -> None:
    from minima.interpolate import parse_args

    assert parse_args(["a.pt", "b.pt", "--alphas", "-1:2:25"]).alphas == "-1:2:25"
    assert parse_args(["a.pt", "--alphas", "-0.5,0,1", "b.pt"]).checkpoint_b == Path("b.pt")


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"), ("0:1", "START:STOP:NUM"), ("a:1:3", "must be numbers"), ("0:1:0", "NUM must be"),
    ("0,x", "not a comma-separated"), ("0,nan", "non-finite"), ("0,1,0", "repeats"),
])
def test_bad_alpha_grids(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_alphas(text)
    np.testing.assert_allclose(parse_alphas("-1:2:25")[[0, 8, 24]], [-1.0, 0.0, 2.0])


def test_bad_inputs(pair: tuple, tmp_path: Path) -> None:
    a_path, _, ds = pair
    other = toy_checkpoint(tmp_path / "wide.pt", 3, ds, widths=(7,))
    with pytest.raises(ck.IncompatibleCheckpointsError, match=r"net.1.weight: shape \(6, 48\) vs \(7, 48\)"):
        run(_req(a_path, other, tmp_path / "x.h5"))
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        run(_req(a_path, tmp_path / "missing.pt", tmp_path / "x.h5"))
    with pytest.raises(ValueError, match="cannot take this data's images"):
        run(_req(a_path, a_path, tmp_path / "x.h5", data="synthetic"))
    four = toy_checkpoint(tmp_path / "four.pt", 3, toy_dataset(num_classes=4))
    np.savez(tmp_path / "three.npz", train_x=np.zeros((6, 4, 4, 3), np.uint8) + np.arange(6)[:, None, None, None]
             .astype(np.uint8), train_y=np.arange(6) % 3, test_x=np.zeros((3, 4, 4, 3), np.uint8),
             test_y=np.arange(3))
    with pytest.raises(ValueError, match="4 outputs but the data has 3 classes"):
        run(_req(four, four, tmp_path / "x.h5", data=str(tmp_path / "three.npz")))
    with pytest.raises(ValueError, match="does not exist"):
        run(_req(a_path, a_path, tmp_path / "nodir" / "x.h5"))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(results.ResultsError, match="not a minima grid or curve file"):
        run(_req(a_path, a_path, foreign))
    with pytest.raises(ValueError, match="needs two checkpoints"):
        run(_req(a_path, None, tmp_path / "x.h5"))
    assert main([str(a_path), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "y.h5")]) == 2


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_plot_cli_and_default_output_name(pair: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_path, b_path, _ = pair
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([str(a_path), str(b_path), "--alphas", "0,0.5,1", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "a_vs_b.h5").exists()  # beside checkpoint A, not in the working directory
    assert_drawn(tmp_path / "a_vs_b.png")
    assert not list(elsewhere.iterdir())
    import matplotlib

    from minima.plot import main as plot_main

    backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # e.g. a notebook's own backend: drawing a file must not switch it (process-wide)
    try:
        assert plot_main([str(tmp_path / "a_vs_b.h5"), "--out", str(tmp_path / "again.png")]) == 0
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(backend)
    assert (tmp_path / "again.png").exists()
    (tmp_path / "junk.h5").write_bytes(b"nope")
    assert plot_main([str(tmp_path / "junk.h5")]) == 2


def test_bfloat16_mode_is_close_to_float32_and_recorded(bn_pair: tuple, tmp_path: Path) -> None:
    """``--dtype bfloat16``: autocast forward passes, float32 parameters and statistics, loss from upcast
    logits — close to float32 (≈ 3 significant digits) but not equal, and marked as such in the file."""
    a_path, b_path, _ = bn_pair
    for policy in ("recompute", "interpolate"):
        curves = {}
        for dtype in ("float32", "bfloat16"):
            out = run(_req(a_path, b_path, tmp_path / f"{policy}_{dtype}.h5", alphas="0:1:3", bn=policy,
                           dtype=dtype))
            curves[dtype] = results.load_curve(out)
        full, half = curves["float32"], curves["bfloat16"]
        assert half.config["dtype"] == "bfloat16" and full.config["dtype"] == "float32"
        for key in ("train_loss", "test_loss"):
            ref, got = getattr(full, key), getattr(half, key)
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, ref, rtol=3e-2)
            assert np.any(got != ref)  # the forward pass really ran in bfloat16
    # each endpoint compared with its checkpoint evaluated in the same precision
    assert half.attrs["endpoint_a_max_rel_diff"] <= 1e-2 and half.attrs["endpoint_b_max_rel_diff"] <= 1e-2


def test_barriers_against_hand_computed_values(pair: tuple, tmp_path: Path) -> None:
    """On a synthetic curve: the loss barrier is the largest rise above the endpoints' line inside [0, 1] (α outside
    is ignored), the accuracy barrier the largest fall below it; a line without α = 1 has none. On a real line the
    file records them and the summary prints them."""
    from minima.files.results import curve_from_values
    from minima.geometry.barriers import barriers

    alpha = np.array([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    loss = np.array([9.0, 1.0, 2.5, 2.0, 1.75, 2.0, 9.0])  # line 1 → 2: at 0.25 the rise is 2.5 − 1.25 = 1.25
    acc = np.array([0.0, 0.9, 0.6, 0.5, 0.7, 0.8, 0.0])  # line 0.9 → 0.8: at 0.5 the fall is 0.85 − 0.5 = 0.35
    values = {"train/loss": loss, "test/loss": loss + 1, "train/accuracy": acc, "test/accuracy": acc,
              "train/nonfinite": np.zeros(7, int), "test/nonfinite": np.zeros(7, int),
              "bn/negative_variance": np.zeros(7, int)}
    found = barriers(curve_from_values(alpha, values, {}))
    assert found["barrier_train_loss"] == pytest.approx(1.25) and found["barrier_train_loss_alpha"] == 0.25
    assert found["barrier_test_loss"] == pytest.approx(1.25)
    assert found["barrier_train_accuracy"] == pytest.approx(0.35) and found["barrier_train_accuracy_alpha"] == 0.5
    assert barriers(curve_from_values(alpha[:5], {k: v[:5] for k, v in values.items()}, {})) == {}
    # the table a one-axis study prints: a row per point with its non-finite count, then the barriers
    from minima.studies.grid import curve_table

    values["test/nonfinite"] = np.array([0, 0, 0, 0, 0, 0, 3])
    table = curve_table(curve_from_values(alpha, values, {}), "alpha", "minima.interpolate").splitlines()
    assert table[0].split() == ["alpha", "train", "loss", "train", "acc", "test", "loss", "test", "acc", "nonfinite"]
    assert table[3].split() == ["0.250", "2.5", "0.6000", "3.5", "0.6000", "0"] and table[7].split()[-1] == "3"
    assert table[8].startswith("[minima.interpolate] barrier") and "1.25" in table[8]
    assert len(curve_table(curve_from_values(alpha, values, {}), "t", "minima.curve", with_barriers=False)
               .splitlines()) == 8

    a_path, b_path, _ = pair
    out = run(_req(a_path, b_path, tmp_path / "c.h5", alphas="0,0.5,1", bn="recompute"))
    curve = results.load_curve(out)
    stored = {k: curve.attrs[k] for k in curve.attrs if str(k).startswith("barrier_")}
    assert stored == pytest.approx(barriers(curve)) and len(stored) == 8
    # the midpoint is the only interior point: the barrier is its rise above the endpoints' mean
    mid = curve.train_loss[1] - (curve.train_loss[0] + curve.train_loss[2]) / 2
    assert stored["barrier_train_loss"] == pytest.approx(max(mid, 0.0), abs=1e-12)
