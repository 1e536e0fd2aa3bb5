"""Golden values: short seeded CPU runs of each training task with their losses pinned (rtol 1e-4), so a refactor
that changes numbers fails here, not in a reader's results. The values were computed by this code on the project's
CPU machine (2026-12-07, AMD EPYC); rtol 1e-4 leaves room for other CPUs' kernels and thread counts, not for a
changed computation. Change a value only with a reason written in the commit."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from minima.files import timeline
from minima.files.rundir import RunDir
from minima.pipelines.runs import run_one, write_table
from minima.pipelines.study import load_study
from minima.studies.curve import train_curve
from minima.studies.train import train
from tests.helpers import toy_checkpoint, toy_dataset
from tests.test_curve import _req
from tests.test_train import _resume_config, _resume_data, _sgd_config, _toy_data
from tests.test_zoo import STUDY

RTOL = 1e-4
GOLDEN: dict[str, list[float]] = {
    "trainer_train_loss": [1.5276197791099548, 1.5037893205881119, 1.4479817137122155],
    "curve_train_loss": [1.0362865229447682, 1.0028068075577419, 0.8581896784404913],
    "probe_hessian": [1.8849642444340367, 1.2838035197100703, 0.5954415612496373, 0.09763509754760764],
    # re-pinned 2026-12-07: `synthetic` is 2048/512 images and --train-subset a stratified subset of them (it used to
    # size the synthetic data itself)
    "zoo_train_loss": [0.7137556682173454, 0.24559376035423552],
    "zoo_test_loss": [0.6453285448114912, 0.24460220703051405],
    "zoo_average": [-0.0034879446029663086, -0.0007844120264053345],
    # pinned 2026-12-07 (AMD EPYC without AVX-512): SAM and ASAM around Adam, and SGD with SWA, on the trainer's run
    "sam_train_loss": [1.508022953569889, 1.4797979906201362, 1.3622208312153816],
    "asam_train_loss": [1.5217667445540428, 1.5166053548455238, 1.4162174239754677],
    "swa_train_loss": [1.535372729599476, 1.5102139800786971, 1.443724262714386],
    "swa_weights_sq_norm": [49.745387674358234],
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Golden runs in one torch thread, whatever the machine's default (restored after): the thread count changes
    the kernels' summation order. (The trainer's test loss is not pinned: in this tiny BatchNorm network, units that
    are almost never active have running variances near ε, and eval mode amplifies the training's rounding — one
    thread against two moves it by 1e-3 while the training loss agrees to 1e-8.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check(name: str, found: list[float]) -> None:
    np.testing.assert_allclose(found, GOLDEN[name], rtol=RTOL, err_msg=name)


def test_golden_trainer(tmp_path: Path) -> None:
    """BatchNorm, dropout, augmentation, Adam with warmup and a cosine schedule: 3 epochs."""
    train(_resume_config(tmp_path / "run"), dataset=_resume_data())
    rows = RunDir(tmp_path / "run").metrics()
    _check("trainer_train_loss", [r["train_loss"] for r in rows])


@pytest.mark.parametrize("kind", ["sam", "asam", "swa"])
def test_golden_flat_optimisers(tmp_path: Path, kind: str) -> None:
    """The trainer's run with SAM / ASAM (ρ 0.05 / 2.0, η 0.01) around Adam, and SGD with SWA from epoch 1: 3 epochs;
    for SWA also the squared norm of the averaged weights (BatchNorm's buffers left out)."""
    settings = {"sam": {"optimizer": "sam", "sam_base": "adam"},
                "asam": {"optimizer": "asam", "sam_base": "adam", "asam_eta": 0.01},
                "swa": {"optimizer": "sgd", "lr": 0.05, "swa_start": 1, "swa_lr": 0.02, "eval_test": False}}[kind]
    config = replace(_resume_config(tmp_path / "run"), **settings)
    train(config, dataset=_resume_data())
    _check(f"{kind}_train_loss", [r["train_loss"] for r in RunDir(tmp_path / "run").metrics()])
    if kind == "swa":
        from minima.files.checkpoint import load_checkpoint

        weights = load_checkpoint(tmp_path / "run" / "swa.pt")["state_dict"]
        _check("swa_weights_sq_norm", [float(sum(v.double().pow(2).sum() for k, v in weights.items()
                                                 if "running" not in k and "num_batches" not in k))])


def test_golden_curve(tmp_path: Path) -> None:
    """A Bézier curve with one bend between two BatchNorm MLPs: 3 epochs."""
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, widths=(6, 5), batchnorm=True)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, widths=(6, 5), batchnorm=True)
    curve = train_curve(_req(a, b, tmp_path / "curve"))
    from minima.files.checkpoint import load_curve_checkpoint

    _check("curve_train_loss", [h["train_loss"] for h in load_curve_checkpoint(curve)["meta"]["history"]])


def test_golden_probe_timeline(tmp_path: Path) -> None:
    """λ_max every 2 steps of an SGD run (and after the last)."""
    config = _sgd_config(tmp_path / "run", epochs=2, batch_size=8, probe=("hessian:2",), probe_subset=16)
    train(config, dataset=_toy_data(32))
    _check("probe_hessian", list(timeline.load(tmp_path / "run" / "probes.h5")["hessian"]["value"]))


def test_golden_zoo_of_two_runs(tmp_path: Path) -> None:
    """Two runs of the zoo's test study (trained, evaluated, measured) and their table."""
    path = tmp_path / "tiny.toml"
    path.write_text(STUDY.format(extra="").replace("batch_size = [16, 32]", "batch_size = [16]"))
    study = load_study(path, tmp_path / "pool")
    assert len(study.runs) == 2
    for spec in study.runs:
        run_one(spec, study)
    with open(write_table(study, tmp_path / "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    _check("zoo_train_loss", [float(r["train_loss"]) for r in rows])
    _check("zoo_test_loss", [float(r["test_loss"]) for r in rows])
    _check("zoo_average", [float(r["average_sigma0.01"]) for r in rows])
