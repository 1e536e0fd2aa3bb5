from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from minima.files import results
from minima.sharpness import main
from minima.studies.sharpness import MeasureRequest, measure

from .helpers import toy_checkpoint, toy_dataset


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_sharpness_cli_stores_resumes_and_refuses_foreign_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds, batchnorm=True)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds, batchnorm=True)
    out = tmp_path / "s.h5"
    argv = [str(a), str(b), "--metrics", "keskar,hessian,trace,adaptive,average", "--eps", "1e-3", "--subspace",
            "4", "--topk", "2", "--trace-max-probes", "12", "--bn", "batch", "--dtype", "float64", "--device",
            "cpu", "--out", str(out), "--batch-size", "32"]
    assert main(argv) == 0
    rows = results.load_sharpness(out)
    metrics = {(r["checkpoint_label"], r["metric"]) for r in rows}
    assert len(metrics) == 2 * 6
    by = {(r["checkpoint_label"], r["metric"]): r for r in rows}
    k = by[("a", "keskar_full_eps0.001")]
    assert k["phi"] == pytest.approx(100 * (k["f_max"] - k["f0"]) / (1 + k["f0"]), rel=1e-12)
    assert k["f_max"] >= k["f0"] and k["bn_mode"] == "batch" and k["maxiter"] == 10
    assert k["train_samples"] == len(ds.train)
    assert k["eval_batch_size"] == 32
    h = by[("a", "hessian_top2")]
    assert h["eigenvalues"].shape == (2,) and h["eigenvalues"][0] >= h["eigenvalues"][1]
    assert np.all(h["residuals"] >= 0) and h["hvps"] > 0
    captured = capsys.readouterr()
    printed = captured.out
    # the old spellings still work, each with one deprecation line naming the new flag
    assert "--bn is deprecated" in captured.err and "use --bn-mode" in captured.err
    assert "--batch-size is deprecated" in captured.err and "use --eval-batch-size" in captured.err
    assert "hessian_top2" in printed and "keskar_sub4_seed0_eps0.001" in printed
    assert "gradient graphs of 3/3 batches kept" in printed  # 96 samples in batches of 32, all kept by default

    # a second run finds everything done and computes nothing
    assert main(argv) == 0
    assert "metric(s) to compute" not in capsys.readouterr().out
    # changing a setting recomputes only what it affects
    assert main([*argv[:-2], "--batch-size", "16"]) == 0
    assert "a: f(x)" in capsys.readouterr().out

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["format"] = "something/else"
    with pytest.raises(results.ResultsError, match="not a minima grid, curve or sharpness file"):
        measure(MeasureRequest(checkpoints=[a], out=foreign, device="cpu"))
    assert main([str(a), "--metrics", "bogus", "--out", str(tmp_path / "x.h5")]) == 2
    assert main([str(a), "--metrics", "hessian", "--hvp-cache-gb", "-1", "--out", str(tmp_path / "y.h5")]) == 2
    assert "--hvp-cache-gb must be ≥ 0" in capsys.readouterr().err
    # old and new spelling disagreeing is refused in one line
    assert main([str(a), "--samples", "10", "--train-subset", "20", "--out", str(tmp_path / "z.h5")]) == 2
    assert "--samples (the old spelling of --train-subset) and --train-subset disagree" in capsys.readouterr().err


def test_sharpness_appends_to_a_curve_file(tmp_path: Path) -> None:
    from minima.interpolate import SweepRequest, run

    ds = toy_dataset()
    a = toy_checkpoint(tmp_path / "a.pt", 1, ds)
    b = toy_checkpoint(tmp_path / "b.pt", 2, ds)
    curve_path = run(SweepRequest(checkpoint_a=a, checkpoint_b=b, alphas="0,1", out=tmp_path / "c.h5", device="cpu",
                                  plot=False, progress=False))
    measure(MeasureRequest(checkpoints=[a, b], metrics=["hessian"], topk=1, out=curve_path, device="cpu",
                           dtype="float64", eig_tol=1e-10))
    curve = results.load_curve(curve_path)  # still a valid curve file
    assert curve.complete
    rows = {r["checkpoint_label"]: r for r in results.load_sharpness(curve_path)}
    assert set(rows) == {"a", "b"} and all(r["relative_error_bounds"][0] < 1e-6 for r in rows.values())
