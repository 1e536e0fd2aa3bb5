"""Probes during training: the timeline equals offline measurements, survives SIGTERM/resume bit for bit, reports
the exact λ_max of a quadratic, and refuses bad requests in one line."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from minima import data
from minima.curvature.probes import adam_preconditioner, stability_threshold
from minima.files import checkpoint as ck
from minima.files import results, timeline
from minima.optim.steps import TrainingInterrupted
from minima.sharpness import main as sharpness_main
from minima.studies.train import TrainConfig, train

from .helpers import logits_of_flat


def _data() -> data.Dataset:
    return data.synthetic(n_train=48, n_test=8, image_shape=(3, 4, 4), num_classes=3, seed=7)


def _config(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 4, 4], "widths": [6]}, epochs=3, batch_size=16,
                       optimizer="sgd", lr=0.1, momentum=0.0, device="cpu", eval_test=False, progress=False,
                       out=str(out), seed=1, probe=("hessian:2", "trace:3"), probe_subset=24, probe_topk=2,
                       save_every=1)
    return replace(base, **kw)


def test_a_probe_equals_the_offline_measurement_of_the_checkpoint_saved_at_its_step(tmp_path: Path) -> None:
    ds = _data()
    train(_config(tmp_path / "run"), dataset=ds)
    line = timeline.load(tmp_path / "run" / "probes.h5")
    hess = line["hessian"]
    # 3 steps per epoch, period 2: steps 2, 4, 6, 8 and the last, 9; trace every 3 steps: 3, 6, 9
    assert hess["step"].tolist() == [2, 4, 6, 8, 9] and line["trace"]["step"].tolist() == [3, 6, 9]
    assert hess["eigenvalues"].shape == (5, 2)
    np.testing.assert_allclose(hess["threshold"], 2 / hess["lr"])  # plain gradient descent: 2/η
    # epoch 2 ends at step 6: its checkpoint measured offline on the same images with the same seed (the step)
    assert sharpness_main([str(tmp_path / "run" / "epoch_0002.pt"), "--metrics", "hessian", "--topk", "2",
                           "--train-subset", "24", "--seed", "6", "--out", str(tmp_path / "s.h5")]) == 0
    (row,) = results.load_sharpness(tmp_path / "s.h5")
    i = int(np.flatnonzero(hess["step"] == 6)[0])
    np.testing.assert_allclose(hess["eigenvalues"][i], row["eigenvalues"], rtol=1e-5)


def test_sigterm_and_resume_give_the_same_timeline_and_weights(tmp_path: Path) -> None:
    ds = _data()
    whole = train(_config(tmp_path / "whole"), dataset=ds)

    def stop_at_5(state: object) -> None:
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        train(_config(tmp_path / "cut"), dataset=ds, on_step=stop_at_5)
    cut = train(_config(tmp_path / "cut"), dataset=ds, resume=True)
    a, b = timeline.load(tmp_path / "whole" / "probes.h5"), timeline.load(tmp_path / "cut" / "probes.h5")
    for probe in ("hessian", "trace"):
        for key in a[probe]:
            np.testing.assert_array_equal(a[probe][key][:, ...] if key != "seconds" else 0,
                                          b[probe][key][:, ...] if key != "seconds" else 0)
    wa, wb = ck.load_checkpoint(whole)["state_dict"], ck.load_checkpoint(cut)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    metrics = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert "probe_seconds" in metrics  # measured apart from images_per_s


def test_the_probe_reports_the_exact_lambda_max_of_a_quadratic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A linear model with the square loss is a quadratic in θ: its Hessian JᵀJ/N is constant, and the probe must
    report its top eigenvalue at every step."""
    ds = _data()
    cfg = _config(tmp_path / "q", model_kwargs={"input_shape": [3, 4, 4], "widths": []}, loss="mse",
                  probe=("hessian:1",), probe_subset=48, batch_size="full", lr=0.01, epochs=4)
    train(cfg, dataset=ds)
    model = ck.model_from_checkpoint(ck.load_checkpoint(tmp_path / "q" / "final.pt")).double()
    x = data.normalize(ds.train.images, ds.mean, ds.std, dtype=torch.float64)
    logits_of, theta = logits_of_flat(model, x)
    target = torch.nn.functional.one_hot(ds.train.labels, 3).double()
    dense = torch.autograd.functional.hessian(lambda t: 0.5 * ((logits_of(t) - target) ** 2).sum(1).mean(), theta)
    exact = float(torch.linalg.eigvalsh(dense).max())
    line = timeline.load(tmp_path / "q" / "probes.h5")["hessian"]
    assert line["step"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(line["value"], exact, rtol=1e-4)
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 2/4")]  # printed with 2/η = 200
    value = line["value"][1]
    assert said and said[0].endswith(f"| hessian {value:.4g} ({value / 200:.2f}× its threshold 200)")
    # λ_max alone, warm-started (the default) from the previous top vector — here an exact eigenvector — and cold
    for start in ("warm", "cold"):
        train(replace(cfg, out=str(tmp_path / start), probe_topk=1, probe_warm_start=start == "warm"), dataset=ds)
    warm, cold = (timeline.load(tmp_path / start / "probes.h5")["hessian"] for start in ("warm", "cold"))
    np.testing.assert_allclose(warm["value"], exact, rtol=1e-4)
    np.testing.assert_allclose(cold["value"], exact, rtol=1e-4)
    assert warm["hvps"][0] == cold["hvps"][0] and (warm["hvps"][1:] < cold["hvps"][1:]).all(), (warm, cold)


def test_adam_preconditioner_and_thresholds() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    assert adam_preconditioner(opt, [p]) is None  # before the first step
    p.grad = torch.tensor([0.5, 2.0])
    opt.step()
    v_hat = torch.tensor([0.5, 2.0], dtype=torch.float64) ** 2  # v₁ = (1 − β₂)g², bias-corrected: g²
    torch.testing.assert_close(adam_preconditioner(opt, [p]), v_hat.sqrt() + 1e-8)
    assert stability_threshold("adam", 0.01, betas=(0.9, 0.999), preconditioned=True) == pytest.approx(3800.0)
    assert stability_threshold("sgd", 0.01, momentum=0.9) == pytest.approx(380.0)
    assert stability_threshold("sgd", 0.01) == pytest.approx(200.0)


@pytest.mark.parametrize(("kw", "message"), [
    ({"probe": ("bogus",)}, "unknown probe 'bogus'"),
    ({"probe": ("hessian:0",)}, "period must be ≥ 1"),
    ({"probe": ("preconditioned",)}, "with plain SGD the preconditioner is the identity"),
    ({"probe_subset": 1000}, "exceeds the 48 training images"),
])
def test_bad_probe_requests_are_refused(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path / "bad", **kw), dataset=_data())
    assert not (tmp_path / "bad" / "probes.h5").exists()


def test_a_default_probe_subset_that_does_not_fit_uses_every_image(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The default --probe-subset (1,000) on a 48-image run: all 48, said in one line; an explicit 1,000 is refused
    (above)."""
    config = _config(tmp_path / "default", probe=("hessian:2",), epochs=1)
    train(replace(config, probe_subset=None), dataset=_data())
    assert "probes measure on all 48 training images (fewer than the default --probe-subset 1000)" in (
        capsys.readouterr().out)
    attrs = timeline.load(tmp_path / "default" / "probes.h5")["_attrs"]
    assert json.loads(attrs["subset"])["n"] == 48


def test_preconditioned_probe_with_adam_and_with_the_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from minima.curvature import probes

    ds = _data()
    cfg = _config(tmp_path / "adam", optimizer="adam", lr=1e-3, probe=("preconditioned:3", "hessian:3"), epochs=1)
    train(cfg, dataset=ds)
    line = timeline.load(tmp_path / "adam" / "probes.h5")
    pre, hess = line["preconditioned"], line["hessian"]
    assert np.isfinite(pre["value"]).all() and (pre["value"] > hess["value"]).all()  # 1/√v̂ ≫ 1 early in training
    np.testing.assert_allclose(pre["threshold"], 38.0 / pre["lr"])  # (2 + 2β₁)/((1 − β₁)η) = 38/η for β₁ = 0.9
    assert np.isnan(hess["threshold"]).all()  # no threshold for Adam's raw λ_max
    # with P = I the preconditioned sharpness is λ_max itself
    monkeypatch.setattr(probes, "adam_preconditioner", lambda opt, params: torch.ones(
        sum(p.numel() for p in params), dtype=torch.float64))
    train(replace(cfg, out=str(tmp_path / "identity")), dataset=ds)
    same = timeline.load(tmp_path / "identity" / "probes.h5")
    np.testing.assert_allclose(same["preconditioned"]["value"], same["hessian"]["value"], rtol=1e-6)


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_plot_draws_a_run_directory_s_probes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from minima.plot import main as plot_main

    from .helpers import assert_drawn

    train(_config(tmp_path / "run", epochs=2), dataset=_data())
    assert plot_main([str(tmp_path / "run")]) == 0
    assert_drawn(tmp_path / "run" / "probes.png")
    (tmp_path / "empty").mkdir()
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert "--probe" in capsys.readouterr().err


@pytest.mark.slow
def test_probes_on_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from .helpers import free_port
    from .test_train import _ddp_worker

    ds = _data()
    cfg = _config(tmp_path / "one", probe=("hessian:3", "trace:3"), save_every=0)
    train(cfg, dataset=ds)
    mp.spawn(_ddp_worker, args=(2, [free_port()], [replace(cfg, out=str(tmp_path / "two"))], ds), nprocs=2,
             join=True)
    one, two = timeline.load(tmp_path / "one" / "probes.h5"), timeline.load(tmp_path / "two" / "probes.h5")
    for probe in ("hessian", "trace"):
        np.testing.assert_array_equal(one[probe]["step"], two[probe]["step"])
        np.testing.assert_allclose(two[probe]["value"], one[probe]["value"], rtol=1e-4)


def test_resuming_a_finished_run_adds_no_probe_rows(tmp_path: Path) -> None:
    ds = _data()
    train(_config(tmp_path / "run", epochs=2), dataset=ds)
    before = timeline.load(tmp_path / "run" / "probes.h5")
    train(_config(tmp_path / "run", epochs=2), dataset=ds, resume=True)
    after = timeline.load(tmp_path / "run" / "probes.h5")
    for probe in ("hessian", "trace"):
        np.testing.assert_array_equal(after[probe]["step"], before[probe]["step"])


def test_probes_of_a_batchnorm_network_use_its_running_statistics_and_leave_training_unchanged(tmp_path: Path) -> None:
    """In ``eval`` mode a probe measures with the live network's BatchNorm statistics at its step (not those of the
    copy made at the start), and probing changes neither the weights nor the statistics the training reaches."""
    ds = _data()
    bn = {"model_kwargs": {"input_shape": [3, 4, 4], "widths": [6], "batchnorm": True}, "probe": ("hessian:1epoch",)}
    probed = train(_config(tmp_path / "run", **bn), dataset=ds)
    line = timeline.load(tmp_path / "run" / "probes.h5")["hessian"]
    assert line["step"].tolist() == [3, 6, 9]  # 3 steps per epoch: after every epoch
    assert sharpness_main([str(tmp_path / "run" / "epoch_0002.pt"), "--metrics", "hessian", "--topk", "2",
                           "--bn-mode", "eval", "--train-subset", "24", "--seed", "6",
                           "--out", str(tmp_path / "s.h5")]) == 0
    (row,) = results.load_sharpness(tmp_path / "s.h5")
    np.testing.assert_allclose(line["eigenvalues"][1], row["eigenvalues"], rtol=1e-5)
    plain = train(_config(tmp_path / "plain", **{**bn, "probe": ()}), dataset=ds)
    wa, wb = ck.load_checkpoint(probed)["state_dict"], ck.load_checkpoint(plain)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_probe_periods_in_epochs_and_steps() -> None:
    from minima.curvature.probes import parse_probes

    specs = parse_probes(["hessian:2epochs", "trace:1epoch", "keskar:30steps", "average"], 7, "sgd", 12)
    assert [(p.every, p.every_epochs) for p in specs] == [(24, 2), (12, 1), (30, None), (7, None)]
    with pytest.raises(ValueError, match="whole number of steps"):
        parse_probes(["hessian:2weeks"], 7, "sgd", 12)
    with pytest.raises(ValueError, match="≥ 1 epoch"):
        parse_probes(["hessian:0epochs"], 7, "sgd", 12)


def test_a_probe_added_on_resume_is_recorded_and_other_probe_settings_are_refused(tmp_path: Path) -> None:
    import json

    ds = _data()

    def stop_at_4(state: object) -> None:
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):  # last.pt at step 4
        train(_config(tmp_path / "run", probe=("hessian:2",)), dataset=ds, on_step=stop_at_4)
    before = (tmp_path / "run" / "probes.h5").read_bytes()
    with pytest.raises(ValueError, match="measured with bn_mode eval, this resume asks for batch"):
        train(_config(tmp_path / "run", probe_bn_mode="batch"), dataset=ds, resume=True)
    assert (tmp_path / "run" / "probes.h5").read_bytes() == before  # nothing written
    train(_config(tmp_path / "run", probe=("hessian:2", "trace:1")), dataset=ds, resume=True)
    line = timeline.load(tmp_path / "run" / "probes.h5")
    entries = {p["name"]: p for p in json.loads(line["_attrs"]["probes"])}
    assert entries["hessian"]["added_at_step"] == 0 and entries["trace"]["added_at_step"] == 4
    assert line["trace"]["step"].tolist() == [5, 6, 7, 8, 9] and line["hessian"]["step"].tolist() == [2, 4, 6, 8, 9]


def test_the_preconditioned_probe_equals_the_dense_scaled_hessian_in_float64() -> None:
    """λ_max of P^-1/2 H P^-1/2 from the probe equals eigvalsh of the dense matrix built from H (float64 autograd on a
    tiny network) and Adam's P = diag(√v̂_t) + ε after a few steps."""
    from minima.curvature.objective import DatasetObjective, FixedBatches
    from minima.curvature.probes import PRECONDITIONED, Prober, ProbeSpec
    from minima.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=3, input_shape=[3, 2, 2], widths=[5]).double()
    x, y = torch.randn(20, 3, 2, 2, dtype=torch.float64), torch.arange(20) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    obj = DatasetObjective(model, FixedBatches([(x[:12], y[:12]), (x[12:], y[12:])], 20, torch.device("cpu"),
                                               torch.float64))
    found = Prober(obj, [ProbeSpec(PRECONDITIONED, 1)], topk=2).run(model, [ProbeSpec(PRECONDITIONED, 1)], 4, opt)
    logits_of, theta = logits_of_flat(model, x)
    dense = torch.autograd.functional.hessian(lambda t: torch.nn.functional.cross_entropy(logits_of(t), y), theta)
    scale = adam_preconditioner(opt, list(model.parameters())).rsqrt()
    exact = torch.linalg.eigvalsh(scale[:, None] * dense * scale[None, :]).flip(0)[:2]
    np.testing.assert_allclose(found[PRECONDITIONED]["eigenvalues"], exact.numpy(), rtol=1e-5)


def test_users_own_probe_through_on_step_sees_the_live_model(tmp_path: Path) -> None:
    """``on_step`` hands a user's probe the live model, optimiser and environment: the weight norm it records at the
    end of epoch 2 (step 6) is that of the checkpoint saved there."""
    seen: dict[int, float] = {}

    def weight_norm(state: object) -> None:
        assert state.env.world_size == 1 and state.optimizer.param_groups[0]["lr"] == state.lr
        seen[state.step] = float(torch.cat([p.detach().reshape(-1) for p in state.model.parameters()]).norm())

    train(_config(tmp_path / "run", probe=()), dataset=_data(), on_step=weight_norm)
    assert sorted(seen) == list(range(1, 10))
    saved = ck.load_checkpoint(tmp_path / "run" / "epoch_0002.pt")["state_dict"]
    assert seen[6] == pytest.approx(float(torch.cat([v.reshape(-1) for k, v in saved.items()
                                                     if "running" not in k and "num_batches" not in k]).norm()),
                                    rel=1e-6)


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_probe_time_is_reported_apart_and_kept_out_of_images_per_second(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes made to take 0.4 s each: ``probe_seconds`` holds that time and the training speed does not — three
    steps of a 6-unit MLP take far less than one probe."""
    import time

    from minima.curvature.probes import Prober

    run = Prober.run

    def slow_run(self: Prober, *args: object, **kw: object) -> dict:
        time.sleep(0.4)
        return run(self, *args, **kw)

    monkeypatch.setattr(Prober, "run", slow_run)
    train(_config(tmp_path / "run", epochs=2, probe=("hessian:1",)), dataset=_data())
    import json

    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)  # 3 steps per epoch, a probe after each
        assert m["probe_seconds"] >= 3 * 0.4
        assert m["train_samples"] / m["images_per_s"] < 0.4  # seconds of training proper, probes excluded


def test_a_probe_sets_its_metrics_parameters(tmp_path: Path) -> None:
    """``NAME:EVERY:KEY=VALUE,…`` — the metric's own parameters (as minima.sharpness names them), recorded in the
    timeline; a looser Lanczos tolerance takes fewer products for the same λ_max to that tolerance; refusals name
    the parameter."""
    ds = _data()
    default = _config(tmp_path / "default", probe=("hessian:3",), epochs=1)
    train(default, dataset=ds)
    loose = replace(default, out=str(tmp_path / "loose"), probe=("hessian:3:eig_tol=0.2,topk=2",),
                    probe_warm_start=False)
    train(loose, dataset=ds)
    train(replace(loose, out=str(tmp_path / "tight"), probe=("hessian:3:eig-tol=0.001,topk=2",)), dataset=ds)
    a = timeline.load(tmp_path / "loose" / "probes.h5")
    b = timeline.load(tmp_path / "tight" / "probes.h5")
    assert a["hessian"]["eigenvalues"].shape[1] == 2  # topk=2 for this probe, whatever --probe-topk says
    assert int(a["hessian"]["hvps"].sum()) < int(b["hessian"]["hvps"].sum())
    np.testing.assert_allclose(a["hessian"]["value"], b["hessian"]["value"], rtol=0.2)
    recorded = json.loads(a["_attrs"]["probes"])
    assert recorded[0]["params"] == {"topk": 2, "eig_tol": 0.2}
    assert "params" not in json.loads(timeline.load(tmp_path / "default" / "probes.h5")["_attrs"]["probes"])[0]
    for spec, message in (("hessian:3:eig_tl=0.1", "hessian has no parameter 'eig_tl'; its parameters"),
                          ("hessian:eig_tol=soft", "eig_tol: 'soft' is neither float"),
                          ("trace:2:trace_max_probes", "is not KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            train(replace(default, out=str(tmp_path / "bad"), probe=(spec,)), dataset=ds)
