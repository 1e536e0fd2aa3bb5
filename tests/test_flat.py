"""SAM, ASAM and SWA in the trainer (``minima.optim.sam``, ``--swa-start``) against hand-computed float64 steps,
torch's own SWA utilities, a 2-rank DDP run and a 2-D quadratic."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from minima import data
from minima.files import checkpoint as ck
from minima.files import timeline
from minima.models import build_model
from minima.optim import sam as sam_mod
from minima.optim.schedule import LRSchedule, learning_rate
from minima.studies.train import TrainConfig, TrainingInterrupted, train

from .helpers import free_port
from .test_train import _ddp_worker

SHAPE = (3, 4, 4)


def _data(n: int = 24) -> data.Dataset:
    return data.synthetic(n_train=n, n_test=8, image_shape=SHAPE, num_classes=3, seed=11)


def _config(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(model="mlp", model_kwargs={"input_shape": list(SHAPE), "widths": [6]}, epochs=2,
                       batch_size=24, optimizer="sam", lr=0.3, momentum=0.9, weight_decay=0.01, device="cpu",
                       eval_test=False, progress=False, out=str(out), seed=4)
    return replace(base, **kw)


def _inputs(ds: data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = data.normalize(ds.train.images, ds.mean, ds.std, torch.float32, False).to(torch.float64)
    return x, ds.train.labels


def _hand_steps(init: dict[str, torch.Tensor], c: TrainConfig, ds: data.Dataset, steps: int
                ) -> dict[str, torch.Tensor]:
    """Full-batch SAM/ASAM with heavy-ball SGD and weight decay on 2-D weights, in float64, written out: ε from the
    gradient at θ, the gradient at θ + ε (BatchNorm normalising by the batch, its running statistics moved only by the
    forward at θ), then v ← μv + (g + λθ), θ ← θ − ηv."""
    model = build_model("mlp", num_classes=3, **c.model_kwargs).to(torch.float64)
    model.load_state_dict(init)
    model.train()
    x, y = _inputs(ds)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    velocity = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(steps):
        theta = {k: p.detach().clone() for k, p in params.items()}
        loss = F.cross_entropy(model(x), y)  # this forward moves the running statistics
        g = torch.autograd.grad(loss, list(params.values()))
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        t = [p.abs() + c.asam_eta if c.optimizer == "asam" else torch.ones_like(p) for p in theta.values()]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g, strict=True)))
        eps = [c.sam_rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]
        perturbed = {k: (theta[k] + e).requires_grad_() for k, e in zip(params, eps, strict=True)}
        out = torch.func.functional_call(model, ({**perturbed}, {k: v.clone() for k, v in buffers.items()}), (x,))
        g2 = torch.autograd.grad(F.cross_entropy(out, y), list(perturbed.values()))
        with torch.no_grad():
            for (k, p), gk in zip(params.items(), g2, strict=True):
                d = gk + (c.weight_decay * theta[k] if p.ndim > 1 else 0)
                velocity[k] = c.momentum * velocity[k] + d
                p.copy_(theta[k] - c.lr * velocity[k])
    return {**{k: p.detach() for k, p in params.items()}, **buffers}


@pytest.mark.parametrize("optimizer", ["sam", "asam"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_sam_and_asam_steps_equal_float64_steps_by_hand(tmp_path: Path, optimizer: str, batchnorm: bool) -> None:
    ds = _data()
    kwargs = {"input_shape": list(SHAPE), "widths": [6], "batchnorm": batchnorm}
    c = _config(tmp_path / "run", optimizer=optimizer, model_kwargs=kwargs,
                sam_rho=0.1 if optimizer == "sam" else 0.5, asam_eta=0.01 if optimizer == "asam" else 0.0)
    final = ck.load_checkpoint(train(c, dataset=ds))["state_dict"]
    init = {k: v.to(torch.float64) if v.is_floating_point() else v
            for k, v in ck.load_checkpoint(tmp_path / "run" / "init.pt")["state_dict"].items()}
    want = _hand_steps(init, c, ds, steps=2)
    moved = max(float((final[k].double() - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-2  # the two steps really moved the weights
    for k, v in want.items():
        if v.is_floating_point():
            torch.testing.assert_close(final[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(final[k], v), k  # BatchNorm's batch counter: one per step, not two


def test_perturbation_has_radius_rho() -> None:
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    for adaptive, eta in ((False, 0.0), (True, 0.0), (True, 0.01)):
        saved = sam_mod.ascent(params, 0.3, adaptive=adaptive, eta=eta)
        eps = [p.detach() - b for p, b in zip(params, before, strict=True)]
        scaled = [e / (b.abs() + eta) if adaptive else e for e, b in zip(eps, before, strict=True)]
        assert math.isclose(float(torch.sqrt(sum((s ** 2).sum() for s in scaled))), 0.3, rel_tol=1e-5)
        sam_mod.restore(saved)
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))  # restored exactly


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_rho_to_zero_is_the_base_optimiser(tmp_path: Path, base: str) -> None:
    ds = _data()
    kwargs = {"input_shape": list(SHAPE), "widths": [6], "batchnorm": True}
    lr = 0.3 if base == "sgd" else 0.01
    sam = _config(tmp_path / "sam", sam_rho=1e-12, sam_base=base, model_kwargs=kwargs, lr=lr, batch_size=8)
    plain = _config(tmp_path / "plain", optimizer=base, model_kwargs=kwargs, lr=lr, batch_size=8)
    a = ck.load_checkpoint(train(sam, dataset=ds))["state_dict"]
    b = ck.load_checkpoint(train(plain, dataset=ds))["state_dict"]
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-7, atol=1e-7, msg=k)


@pytest.mark.slow  # two spawned gloo ranks
def test_ddp_sam_perturbs_each_rank_by_its_own_gradient(tmp_path: Path) -> None:
    """2 ranks: each half-batch's ε from that half's gradient (m-sharpness), the perturbed gradients averaged."""
    ds = _data(16)
    c = _config(tmp_path / "ddp", batch_size=16, weight_decay=0.0, sam_rho=0.2)
    mp.spawn(_ddp_worker, args=(2, [free_port()], [c], ds), nprocs=2, join=True)
    got = ck.load_checkpoint(tmp_path / "ddp" / "final.pt")["state_dict"]
    model = build_model("mlp", num_classes=3, **c.model_kwargs)
    model.load_state_dict(ck.load_checkpoint(tmp_path / "ddp" / "init.pt")["state_dict"])
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
    params = list(model.parameters())
    for epoch in range(c.epochs):
        order = data.epoch_permutation(16, c.seed, epoch)
        halves = order.split(8)
        grads = []
        for half in halves:
            x = data.normalize(ds.train.images[half], ds.mean, ds.std, torch.float32, False)
            y = ds.train.labels[half]
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            saved = sam_mod.ascent(params, c.sam_rho, adaptive=False)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grads.append([p.grad.clone() for p in params])
            sam_mod.restore(saved)
        for p, g0, g1 in zip(params, *grads, strict=True):
            p.grad = (g0 + g1) / 2
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _resume_config(out: Path, **kw: object) -> TrainConfig:
    # BatchNorm, dropout, augmentation and a schedule: every source of state and randomness a resume must restore
    base = TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 8, 8], "widths": [16, 16], "batchnorm": True,
                                                    "dropout": 0.3},
                       epochs=3, batch_size=8, optimizer="sam", lr=0.05, augment=True, schedule="cosine",
                       device="cpu", progress=False, out=str(out), seed=5)
    return replace(base, **kw)


@pytest.mark.parametrize("kw", [{}, {"optimizer": "asam", "sam_base": "adam", "lr": 1e-2, "asam_eta": 0.01},
                                {"optimizer": "sgd", "swa_start": 1, "swa_lr": 0.02, "swa_anneal_epochs": 1}],
                         ids=["sam", "asam-adam", "swa"])
def test_sigterm_then_resume_is_bit_identical(tmp_path: Path, kw: dict) -> None:
    ds = data.synthetic(n_train=40, n_test=16, image_shape=(3, 8, 8), num_classes=4, seed=6)
    config = _resume_config(tmp_path / "ref", **kw)
    reference = ck.load_checkpoint(train(config, dataset=ds))["state_dict"]

    def send_sigterm(state: object) -> None:
        if state.step == 12:  # epoch 3, batch 2 of 5: after --swa-start 1 and one averaged epoch
            os.kill(os.getpid(), signal.SIGTERM)

    run = replace(config, out=str(tmp_path / "run"))
    with pytest.raises(TrainingInterrupted):
        train(run, dataset=ds, on_step=send_sigterm)
    if "swa_start" in kw:
        assert ck.load_checkpoint(tmp_path / "run" / "last.pt")["swa"]["n_averaged"] == 1
    resumed = ck.load_checkpoint(train(run, dataset=ds, resume=True))["state_dict"]
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k
    if "swa_start" in kw:
        a, b = (ck.load_checkpoint(tmp_path / d / "swa.pt")["state_dict"] for d in ("ref", "run"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_swa_is_the_mean_of_the_epochs_weights_with_recomputed_batchnorm(tmp_path: Path) -> None:
    ds = _data(48)
    c = _config(tmp_path / "run", optimizer="sgd", epochs=4, batch_size=8, swa_start=1, swa_lr=0.05, save_every=1,
                weight_decay=0.0, eval_batch_size=1000,
                model_kwargs={"input_shape": list(SHAPE), "widths": [6], "batchnorm": True})
    train(c, dataset=ds)
    swa = ck.load_checkpoint(tmp_path / "run" / "swa.pt")
    assert swa["meta"]["metrics"]["swa_n_averaged"] == 3
    epochs = [ck.load_checkpoint(tmp_path / "run" / f"epoch_{e:04d}.pt")["state_dict"] for e in (2, 3, 4)]
    model = build_model("mlp", num_classes=3, **c.model_kwargs)
    for name, _ in model.named_parameters():
        torch.testing.assert_close(swa["state_dict"][name], sum(w[name] for w in epochs) / 3, rtol=1e-6, atol=1e-7)
    # update_bn over all 48 training images in one batch: the BatchNorm input's exact mean and unbiased variance
    model.load_state_dict(swa["state_dict"])
    x = data.normalize(ds.train.images, ds.mean, ds.std, torch.float32, False)
    hidden = model.net[1](model.net[0](x)).double()
    torch.testing.assert_close(swa["state_dict"]["net.2.running_mean"].double(), hidden.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(swa["state_dict"]["net.2.running_var"].double(), hidden.var(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("anneal", [0, 1, 3])
def test_swa_learning_rate_is_swalr_stepped_per_epoch(anneal: int) -> None:
    s = LRSchedule(peak_lr=0.4, start_lr=0.4, warmup_steps=0, total_steps=100, kind="cosine", swa_start=20,
                   swa_lr=0.05, swa_anneal_epochs=anneal, steps_per_epoch=5)
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=learning_rate(19, s))  # the LR SWALR finds in the group when it starts
    swalr = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=anneal, anneal_strategy="cos")
    for epoch in range(6):
        for step in range(20 + 5 * epoch, 25 + 5 * epoch):
            assert math.isclose(learning_rate(step, s), opt.param_groups[0]["lr"], rel_tol=1e-12), (epoch, step)
        opt.step()
        swalr.step()


def test_sam_edge_is_where_sam_on_a_quadratic_stops_being_stable() -> None:
    """f(x, y) = G·x + ½λy²: the gradient norm stays ≈ G, and full-batch SAM (``ascent``, then the gradient at the
    perturbed point, then θ − η·g) keeps y at 0 for λ just below λ_SAM and drives it away just above."""
    eta, rho, big_g = 0.1, 0.05, 2.0
    edge = sam_mod.sam_edge(2 / eta, rho, big_g)
    assert math.isclose(edge, big_g / (2 * rho) * (math.sqrt(1 + 8 * rho / (eta * big_g)) - 1), rel_tol=1e-12)
    assert math.isclose(sam_mod.sam_edge(2 / eta, 1e-9, big_g), 2 / eta, rel_tol=1e-7)  # ρ → 0: 2/η

    def final_y(lam: float) -> float:
        theta = torch.tensor([0.0, 1e-6], dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            return big_g * theta[0] + 0.5 * lam * theta[1] ** 2

        for _ in range(300):
            theta.grad = torch.autograd.grad(loss(), theta)[0]
            saved = sam_mod.ascent([theta], rho, adaptive=False)
            theta.grad = torch.autograd.grad(loss(), theta)[0]
            sam_mod.restore(saved)
            with torch.no_grad():
                theta -= eta * theta.grad
        return abs(float(theta.detach()[1]))

    assert final_y(edge * 0.98) < 1e-6  # contracts
    assert final_y(edge * 1.02) > 1e-4  # grows by > 100×


def test_sam_probes_record_the_edge_from_the_gradient_norm(tmp_path: Path) -> None:
    ds = _data()
    c = _config(tmp_path / "run", momentum=0.5, weight_decay=0.0, sam_rho=0.1, probe=("hessian:1",))
    train(c, dataset=ds)
    rows = timeline.load(tmp_path / "run" / "probes.h5")["hessian"]
    model = build_model("mlp", num_classes=3, **c.model_kwargs)
    model.load_state_dict(ck.load_checkpoint(tmp_path / "run" / "final.pt")["state_dict"])
    x, y = _inputs(ds)
    model.double()
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grad)))
    assert math.isclose(rows["grad_norm"][-1], norm, rel_tol=1e-5)
    for threshold, grad_norm, edge in zip(rows["threshold"], rows["grad_norm"], rows["sam_threshold"], strict=True):
        assert math.isclose(threshold, 2 * 1.5 / c.lr, rel_tol=1e-12)
        assert math.isclose(edge, sam_mod.sam_edge(threshold, 0.1, grad_norm), rel_tol=1e-12) and edge < threshold


def test_flat_settings_that_cannot_be_honoured_are_refused(tmp_path: Path) -> None:
    from minima.studies.train import validate_config

    for kw, message in (({"optimizer": "sgd", "sam_rho": 0.1}, "apply to --optimizer sam or asam"),
                        ({"asam_eta": 0.01}, "asam only"),
                        ({"optimizer": "sgd", "swa_start": 2}, "at least|in \\[0, epochs"),
                        ({"optimizer": "sgd", "swa_start": 1}, "needs --swa-lr"),
                        ({"optimizer": "sgd", "swa_lr": 0.1}, "need --swa-start")):
        with pytest.raises(ValueError, match=message):
            validate_config(_config(tmp_path / "x", **kw))


def test_cutout_zeroes_one_clipped_square_per_image_in_every_channel() -> None:
    x = torch.randn(64, 3, 8, 8) + 10  # no zeros of its own
    out = data.cutout(x, 4, torch.Generator().manual_seed(3))
    again = data.cutout(x, 4, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the generator decides everything
    gen = torch.Generator().manual_seed(3)
    rows, cols = torch.randint(0, 8, (64,), generator=gen), torch.randint(0, 8, (64,), generator=gen)
    for i in range(64):  # the square by hand: rows r−2 … r+1 and columns c−2 … c+1, clipped to the image
        want = torch.ones(8, 8, dtype=torch.bool)
        want[max(int(rows[i]) - 2, 0):int(rows[i]) + 2, max(int(cols[i]) - 2, 0):int(cols[i]) + 2] = False
        for ch in range(3):
            assert torch.equal(out[i, ch] != 0, want), i
            assert torch.equal(out[i, ch][want], x[i, ch][want])
    # with p = 0.5 (davda54/sam's recipe) the same squares, on exactly the images whose uniform draw is below p
    half = data.cutout(x, 4, torch.Generator().manual_seed(3), p=0.5)
    gen = torch.Generator().manual_seed(3)
    torch.randint(0, 8, (64,), generator=gen), torch.randint(0, 8, (64,), generator=gen)
    cut = torch.rand(64, generator=gen) < 0.5
    assert 0 < int(cut.sum()) < 64
    for i in range(64):
        assert torch.equal(half[i], out[i] if cut[i] else x[i]), i


def test_label_smoothing_trains_on_the_smoothed_targets(tmp_path: Path) -> None:
    ds = _data()
    c = _config(tmp_path / "run", optimizer="sgd", epochs=1, momentum=0.0, weight_decay=0.0, label_smoothing=0.2)
    final = ck.load_checkpoint(train(c, dataset=ds))["state_dict"]
    model = build_model("mlp", num_classes=3, **c.model_kwargs).double()
    model.load_state_dict(ck.load_checkpoint(tmp_path / "run" / "init.pt")["state_dict"])
    x, y = _inputs(ds)
    log_p = torch.log_softmax(model(x), dim=1)
    target = torch.full_like(log_p, 0.2 / 3).scatter_(1, y[:, None], 1 - 0.2 + 0.2 / 3)  # (1 − s)·onehot + s/K
    grads = torch.autograd.grad(-(target * log_p).sum(1).mean(), list(model.parameters()))
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(final[name].double(), p.detach() - c.lr * g, rtol=1e-5, atol=1e-6, msg=name)
    # what the run reports stays the plain cross-entropy at the weights of the step
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    assert math.isclose(float(json.loads(line)["train_loss"]), float(F.cross_entropy(model(x), y).detach()),
                        rel_tol=1e-5)


def test_torchs_label_smoothing_10_9ths_is_davda54s_smoothing() -> None:
    """davda54/sam's smooth_crossentropy(0.1) targets 0.9 on the label and 0.1/9 elsewhere; PyTorch's label_smoothing
    s targets 1 − s + s/K and s/K: with s = 0.1·K/(K − 1) the targets, hence the gradients, are the same."""
    torch.manual_seed(0)
    logits = torch.randn(8, 10, dtype=torch.float64, requires_grad=True)
    y = torch.arange(8)
    target = torch.full((8, 10), 0.1 / 9, dtype=torch.float64).scatter_(1, y[:, None], 0.9)
    theirs = torch.autograd.grad(-(target * torch.log_softmax(logits, 1)).sum(1).mean(), logits)[0]
    ours = torch.autograd.grad(F.cross_entropy(logits, y, label_smoothing=0.11111111111111112), logits)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_wide_resnet_has_the_published_layout() -> None:
    model = build_model("wrn16_8", 10)

    def unit(cin: int, cout: int) -> int:  # BN(cin), conv3×3 cin→cout, BN(cout), conv3×3 cout→cout, 1×1 if changed
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)

    widths = [16, 128, 256, 512]
    count = 27 * 16 + sum(unit(widths[g], widths[g + 1]) + unit(widths[g + 1], widths[g + 1]) for g in range(3))
    count += 2 * 512 + 512 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == count == 10_961_370
    # davda54/sam's WideResNet(16, 8): one more unit per group (units=3), 17,158,106 parameters
    extra = sum(unit(widths[g + 1], widths[g + 1]) for g in range(3))
    davda = build_model("wide_resnet", 10, depth=16, width=8, units=3)
    assert sum(p.numel() for p in davda.parameters()) == count + extra == 17_158_106
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 10))  # davda54/sam: a zero last layer
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wide_resnet", 10, depth=15)


def test_sam_with_micro_batches_equals_one_batch(tmp_path: Path) -> None:
    """Both passes accumulate over the micro-batches (the inputs kept for the second): the same ε and step."""
    ds = _data()
    whole = ck.load_checkpoint(train(_config(tmp_path / "whole"), dataset=ds))["state_dict"]
    micro = ck.load_checkpoint(train(_config(tmp_path / "micro", micro_batch=8), dataset=ds))["state_dict"]
    for k, v in whole.items():
        torch.testing.assert_close(micro[k], v, rtol=1e-6, atol=1e-7, msg=k)
