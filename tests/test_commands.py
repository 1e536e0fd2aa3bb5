"""What a new user meets on the command line: help with real defaults, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minima.core import config as cfg
from minima.curvature import registry as metrics
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.files import results
from minima.files.checkpoint import load_model
from minima.geometry.evaluate import Batching
from minima.interpolate import main as interpolate_main
from minima.sharpness import main as sharpness_main
from minima.sharpness import parse_args as sharpness_args
from minima.studies import interpolate as sweep
from minima.studies.sharpness import MeasureRequest, result_jobs
from minima.studies.train import TrainConfig
from minima.train import main as train_main

from .helpers import toy_checkpoint, toy_dataset

ROOT = Path(__file__).resolve().parents[1]


HELP_COMMANDS = ("train", "interpolate", "sharpness", "plot")
# every command's `python -m minima.X --help`, run as __main__ in one fresh interpreter (one torch import, not four)
HELP_SCRIPT = """
import contextlib, io, runpy, sys
for command in sys.argv[1:]:
    sys.argv = ["python -m minima." + command, "--help"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        runpy.run_module("minima." + command, run_name="__main__", alter_sys=True)
    print(text.getvalue(), end="\\0")
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *HELP_COMMANDS], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    texts = out.split("\0")[:-1]
    assert len(texts) == len(HELP_COMMANDS) and all("usage: python -m minima." in t for t in texts)
    return dict(zip(HELP_COMMANDS, texts, strict=True))


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_shows_real_defaults_and_units(command: str, help_texts: dict[str, str]) -> None:
    flat = " ".join(help_texts[command].split())
    assert "(default: None)" not in flat and "default: True" not in flat and "(default: recompute) (default" not in flat
    if command == "train":
        assert "--batch-size INT|full global batch size: samples per optimiser step over all ranks, or full " \
               "(full-batch gradient descent" in flat and "[samples] (default: 256)" in flat
        assert "--optimizer {adam,sgd,sam,asam}" in flat and "(default: adam)" in flat
        assert "--micro-batch INT" in flat and "(default: the per-rank batch)" in flat
    if command == "interpolate":
        assert "--bn {recompute,batch,interpolate}" in flat and "(default: recompute for models with BatchNorm)" in flat
        assert "--dtype {float32,float64,bfloat16}" in flat and "--subset-seed INT seed of the stratified" in flat
    if command == "sharpness":
        assert "--full-space, --no-full-space also measure with A = I" in flat and "(default: on)" in flat
        for p in metrics.all_params():  # every registered metric parameter is a flag with help
            assert f"--{p.name.replace('_', '-')}" in flat
        assert "--out PATH output .h5 file" in flat and "--dtype {float32,float64}" in flat


def test_requests_are_generated_from_the_same_fields() -> None:
    """Flags, TOML and Python all reach the same request; resume keys depend only on the values."""
    req = sharpness_args(["a.pt", "b.pt", "--metrics", "keskar,hessian", "--eps", "1e-3", "--no-full-space"])
    assert req == MeasureRequest(checkpoints=[Path("a.pt"), Path("b.pt")], metrics=("keskar,hessian",), eps=(1e-3,),
                                 full_space=False)
    assert [name for _, name, _ in result_jobs(req)] == [
        "keskar_sub100_seed0_eps0.001", "hessian_top5"]
    assert cfg.resume_key({"a": 1, "b": [1, 2]}) == cfg.resume_key({"b": [1, 2], "a": 1})
    assert cfg.resume_key({"a": 1}) != cfg.resume_key({"a": 2})
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, TrainConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "lamb"])  # a Literal field is a choice


def test_unknown_metric_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'bogus'; choose from \['adaptive', 'alpha_sharpness', "
                                         r"'average', 'density', 'diagonal', "
                                         r"'gradient_noise', 'hessian', 'keskar', 'norms', 'pacbayes', 'trace', "
                                         r"'trace_sq', 'worst_case'\]"):
        metrics.get_metric("bogus")
    with pytest.raises(ValueError, match="already registered"):
        metrics.register(metrics.REGISTRY["trace"])


def test_every_registered_metric_returns_its_declared_fields() -> None:
    ds = toy_dataset()
    torch.manual_seed(0)
    from minima.models import build_model

    model = build_model("mlp", num_classes=3, input_shape=(3, 4, 4), widths=(4,)).double()
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std,
                                                          Batching(48, dtype=torch.float64)), hvp_cache_bytes=2**30)
    x = obj.get_flat()
    f0 = obj.value(x)
    small = {"eps": (1e-3,), "subspace": 3, "subspace_seed": 0, "full_space": True, "maxiter": 2, "topk": 2,
             "eig_tol": 1e-6, "eig_method": "lanczos", "trace_rtol": 0.5, "trace_max_probes": 10, "rho": 0.05,
             "adaptive_steps": 2, "sigma": 0.01, "average_samples": 3, "trace_method": "hutchinson",
             "density_probes": 2, "density_steps": 5, "worst_rho": 0.05, "worst_norm": "linf", "worst_adaptive": True,
             "worst_m": 16, "worst_n": 48, "worst_iterations": 3, "worst_l2_step": "invariant",
             "worst_logit_norm": False, "norm_measures": (), "norms_init": None, "norms_adjust": True,
             "noise_batch": 16, "pacbayes_measures": (), "pacbayes_init": None, "pacbayes_draws": 3,
             "pacbayes_depth": 4, "pacbayes_drop": 0.1, "pacbayes_convention": "paper", "pacbayes_adjust": True,
             "alpha_depth": 3, "alpha_steps": 2, "alpha_drop": 0.1, "eig_which": "largest", "worst_loop": "authors",
             "diag_probes": 4, "diag_exact_below": 0, "diag_method": "hutchinson", "trace_sq_rtol": 0.5,
             "trace_sq_max_probes": 10}
    variants = {"trace": [{"trace_method": "hutchpp"}], "hessian": [{"eig_which": "both"}],
                "diagonal": [{"diag_exact_below": 1000}, {"diag_method": "xdiag"}],
                "worst_case": [{"worst_norm": "l2"}, {"worst_logit_norm": True}, {"worst_loop": "apgd"},
                               {"worst_norm": "l2", "worst_l2_step": "authors"}]}
    for metric in metrics.REGISTRY.values():
        for change in [{}, *variants.get(metric.name, [])]:
            params = {p.name: {**small, **change}[p.name] for p in metric.params}
            _check_fields(metric, params, obj, x, f0)


def _check_fields(metric: metrics.Metric, params: dict, obj: DatasetObjective, x: torch.Tensor, f0: float) -> None:
    for name, job in metric.jobs(params):
        obj.set_flat(x)
        out = metric.compute(obj, x, f0, job, 0)
        assert set(out) == {"value", *metric.fields}, name
        assert np.isfinite(out["value"]), name


def test_unreadable_checkpoints_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    good = toy_checkpoint(tmp_path / "good.pt", 1, ds)
    for name, content in (("notes.pt", "plain text\n"), ("config.pt", '{"a": 1}'), ("preset.pt", "x = 1\n")):
        bad = tmp_path / name
        bad.write_text(content)
        assert interpolate_main([str(good), str(bad), "--out", str(tmp_path / "x.h5"), "--no-progress"]) == 2
        assert sharpness_main([str(bad), "--out", str(tmp_path / "y.h5")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("is not a PyTorch checkpoint (a text file" in line for line in err), err
        assert all("pickled" not in line and "Traceback" not in line for line in err)
    assert train_main(["--init-from", str(tmp_path / "notes.pt"), "--data", "synthetic", "--model", "mlp",
                       "--out", str(tmp_path / "run"), "--no-progress"]) == 2


def test_endpoint_mismatch_exits_nonzero_and_keeps_the_curve(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, batchnorm=True)
    monkeypatch.setitem(sweep.ENDPOINT_TOLERANCE, torch.float32, -1.0)  # every difference is too large
    out = tmp_path / "c.h5"
    argv = [str(a), str(b), "--alphas", "0,1", "--bn", "interpolate", "--out", str(out), "--no-progress",
            "--no-plot", "--device", "cpu"]
    assert interpolate_main(argv) == 1
    err = capsys.readouterr().err
    assert "endpoint check failed: checkpoint A (α = 0) differs by" in err and "checkpoint B (α = 1)" in err
    assert results.load_curve(out).complete  # finished work kept
    monkeypatch.setitem(sweep.ENDPOINT_TOLERANCE, torch.float32, 1e-5)
    assert interpolate_main([*argv, "--overwrite"]) == 0
    assert "endpoint check OK" in capsys.readouterr().out
    assert interpolate_main([*argv, "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict" in capsys.readouterr().err


ADD_A_METRIC = '''
import sys
import torch
from minima.curvature import registry as metrics

def gradient_norm(obj, x, f0, job, seed):  # the new metric's function
    _, g = obj.value_and_grad(x)
    return {"value": float(g.norm(p=job["p"])), "p": job["p"]}

metrics.register(metrics.Metric(  # its registry entry
    name="gradnorm", summary="norm of the gradient", params=(metrics.Param("grad_norm_p", float, 2.0, "norm order"),),
    jobs=lambda p: [(f"gradnorm_p{p['grad_norm_p']:g}", {"p": p["grad_norm_p"]})], compute=gradient_norm,
    fields=("p",)))

from minima.sharpness import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # several processes
def test_a_metric_added_through_the_registry_gets_flags_results_and_resume(tmp_path: Path) -> None:
    """A metric is its function plus one registry entry: the command then accepts it in --metrics, has a flag
    for its parameter, stores its result under its name and skips it on a re-run."""
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    script = tmp_path / "with_gradnorm.py"
    script.write_text(ADD_A_METRIC)
    out = tmp_path / "s.h5"
    argv = [sys.executable, str(script), str(a), "--metrics", "gradnorm", "--grad-norm-p", "1", "--out", str(out),
            "--device", "cpu", "--dtype", "float64"]
    first = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    (row,) = results.load_sharpness(out)
    model_obj = DatasetObjective(load_model(a)[0],
                                 FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(dtype=torch.float64)))
    grad = model_obj.value_and_grad()[1]
    assert row["metric"] == "gradnorm_p1" and row["value"] == pytest.approx(float(grad.norm(p=1)), rel=1e-10)
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "metric(s) to compute" not in again.stdout  # resumed: nothing to do
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    assert "--grad-norm-p FLOAT" in help_text and "gradnorm — norm of the gradient" in " ".join(help_text.split())


@pytest.mark.parametrize("command", ["train", "interpolate", "surface", "sharpness"])
def test_every_documented_default_is_what_the_command_parses(command: str) -> None:
    """The "(default: X)" that --help prints for a flag is the value the command gets when the flag is not given; a
    default described in prose (``default_text``) names the value when it is a word (``--y``'s said "as --x" while
    the command got ``auto``)."""
    import dataclasses
    import importlib

    from minima.core.config import _show, help_text

    module = importlib.import_module(f"minima.{command}")
    required = {"train": [], "interpolate": ["a.pt", "b.pt"], "surface": ["a.pt"], "sharpness": ["a.pt"]}[command]
    parsed = module.parse_args(required)
    req = parsed[0] if isinstance(parsed, tuple) else parsed
    for f in dataclasses.fields(req):
        if f.metadata.get("positional"):
            continue
        shown = help_text(f).replace("%%", "%").rsplit("(default: ", 1)[1][:-1]
        value = getattr(req, f.name)
        if f.metadata.get("default_text"):
            if isinstance(value, str):
                assert value in shown, f"--{f.name}: help says {shown!r}, the command gets {value!r}"
        else:
            assert shown == _show(value), f"--{f.name}: help says {shown!r}, the command gets {value!r}"
