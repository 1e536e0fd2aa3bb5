"""Correlation scores of generalisation measures against brute-force definitions on planted tables."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from minima.pipelines import correlation as corr
from minima.pipelines.correlation import Networks


def _grid(seed: int = 0, seeds: int = 1) -> Networks:
    """A 2×3×2 grid (lr, depth, width) × seeds with a gap that depends on every hyper-parameter plus noise."""
    rng = np.random.default_rng(seed)
    rows = list(itertools.product(["0.1", "0.01"], ["1", "2", "3"], ["8", "16"], [str(s) for s in range(seeds)]))
    gap = np.array([0.3 * (lr == "0.1") + 0.1 * int(d) - 0.05 * (w == "16") for lr, d, w, _ in rows])
    gap = gap + rng.normal(0, 0.02, len(rows))
    return Networks(hparams={"lr": [r[0] for r in rows], "depth": [r[1] for r in rows],
                             "width": [r[2] for r in rows]}, gap=gap, measures={},
                    seeds=[r[3] for r in rows] if seeds > 1 else None)


def _tau_loop(mu: np.ndarray, gap: np.ndarray) -> float:
    n, total = len(gap), 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += np.sign(mu[i] - mu[j]) * np.sign(gap[i] - gap[j])
    return total / (n * (n - 1))


def test_kendall_tau_is_jiangs_sum_over_ordered_pairs() -> None:
    nets = _grid()
    rng = np.random.default_rng(1)
    mu = nets.gap + rng.normal(0, 0.1, nets.n)
    mu[3] = mu[4]  # a tie counts 0
    assert corr.kendall_tau(mu, nets.gap) == pytest.approx(_tau_loop(mu, nets.gap), abs=1e-15)
    assert corr.kendall_tau(nets.gap, nets.gap) == pytest.approx(1.0)
    assert corr.kendall_tau(-nets.gap, nets.gap) == pytest.approx(-1.0)


def test_granulated_psi_equals_its_definition_on_a_2x2x2_table() -> None:
    rows = list(itertools.product("ab", "xy", "uv"))
    rng = np.random.default_rng(2)
    gap, mu = rng.normal(size=8), rng.normal(size=8)
    nets = Networks({"p": [r[0] for r in rows], "q": [r[1] for r in rows], "r": [r[2] for r in rows]}, gap, {},
                    None)
    psi, per = corr.granulated(nets, mu)
    for k, name in enumerate("pqr"):  # by hand: the 4 cells of two networks that differ only in this one
        taus = []
        for i, j in itertools.combinations(range(8), 2):
            if all(rows[i][m] == rows[j][m] for m in range(3) if m != k):
                taus.append(np.sign(mu[i] - mu[j]) * np.sign(gap[i] - gap[j]))  # τ of a pair (both orders)
        assert len(taus) == 4
        assert per[name] == pytest.approx(np.mean(taus), abs=1e-15)
    assert psi == pytest.approx(np.mean(list(per.values())), abs=1e-15)


def _cmi_loop(nets: Networks, mu: np.ndarray, hs: tuple[str, ...]) -> float:
    """PGDL's conditional mutual information for one conditioning set, by counting (complete grid)."""
    cells: dict[tuple, np.ndarray] = {}
    for i in range(nets.n):
        for j in range(nets.n):
            key = tuple((nets.hparams[h][i], nets.hparams[h][j]) for h in hs)
            t = cells.setdefault(key, np.zeros((2, 2)))
            t[0 if nets.gap[i] > nets.gap[j] else 1, 0 if mu[i] > mu[j] else 1] += 1
    mis, ents = [], []
    for t in cells.values():
        p = t / t.sum()
        pg, pm = p.sum(1), p.sum(0)
        mis.append(sum(p[a, b] * math.log2(p[a, b] / (pg[a] * pm[b])) for a in range(2) for b in range(2)
                       if p[a, b] > 0))
        ents.append(-sum(q * math.log2(q + 1e-12) for q in pg))
    return float(np.mean(mis) / np.mean(ents))


def test_cmi_matches_counting_and_scores_the_gap_one_and_a_hyper_parameter_zero() -> None:
    nets = _grid()
    rng = np.random.default_rng(3)
    mu = nets.gap + rng.normal(0, 0.05, nets.n)
    for size in (0, 1, 2):
        brute = min(_cmi_loop(nets, mu, hs) for hs in itertools.permutations(nets.hparams, size))
        assert corr.conditional_mi(nets, mu, size) == pytest.approx(brute, rel=1e-12)
    assert corr.conditional_mi(nets, nets.gap, 2) == pytest.approx(1.0, abs=1e-10)  # the gap itself
    depth_only = np.array([float(d) for d in nets.hparams["depth"]])  # a function of one hyper-parameter
    assert corr.conditional_mi(nets, depth_only, 1) == pytest.approx(0.0, abs=1e-12)  # conditioned on depth
    assert corr.conditional_mi(nets, depth_only, 0) > 0.05  # unconditioned it carries information


def test_robust_sign_error_weights_a_hand_computed_pair() -> None:
    assert corr.hoeffding_weight(0.0, 10_000) == 0.0
    d, n = 0.03, 10_000
    h = (1 - 2 * math.exp(-2 * n * (d / 2) ** 2)) ** 2
    assert corr.hoeffding_weight(d, n) == pytest.approx(h - 0.5, abs=1e-15)
    # two configurations differing in lr, one network each: one environment each way with weight w, ESS 1
    nets = Networks({"lr": ["a", "b"]}, np.array([0.2, 0.23]), {}, None)
    wrong = np.array([2.0, 1.0])  # ranks the pair the wrong way
    assert corr.robust_sign_errors(nets, wrong, n, min_ess=1).tolist() == [1.0, 1.0]
    assert corr.robust_sign_errors(nets, -wrong, n, min_ess=1).tolist() == [0.0, 0.0]
    assert corr.robust_sign_errors(nets, wrong, n, min_ess=2).size == 0  # ESS 1 < 2: dropped


def test_bootstrap_over_seeds_brackets_the_estimate() -> None:
    nets = _grid(seeds=4)
    mu = nets.gap + np.random.default_rng(4).normal(0, 0.1, nets.n)
    row = corr.score(Networks(nets.hparams, nets.gap, {"noisy": mu}, nets.seeds), test_images=10_000,
                     bootstrap=100)[0]
    assert row["kendall_tau_lo"] <= row["kendall_tau"] <= row["kendall_tau_hi"]
    assert row["psi_lo"] <= row["psi_hi"] and set(row) >= {"cmi", "cmi_s0", "cmi_s1", "psi_lr", "environments"}


def test_a_table_is_read_with_exclusions_and_percentages(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = [{"model": m, "lr": lr, "train_acc": 99.0, "test_acc": t, "phi": p, "status": s, "converged": c}
            for m, lr, t, p, s, c in [("a", "0.1", 80.0, 5.0, "complete", "yes"),
                                      ("b", "0.1", 70.0, 9.0, "complete", "yes"),
                                      ("c", "0.01", 75.0, 7.0, "complete", ""),
                                      ("d", "0.01", 60.0, "", "complete", "yes"),
                                      ("e", "0.1", 50.0, 1.0, "diverged", ""),
                                      ("f", "0.01", 40.0, 2.0, "complete", "no")]]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    nets = corr.read_table(path, hparams=["lr"])
    assert nets.n == 4 and list(nets.measures) == ["phi"]
    assert nets.excluded == {"status diverged": 1, "not converged to its training target": 1}
    np.testing.assert_allclose(nets.gap, [0.19, 0.29, 0.24, 0.39])  # percentages read as fractions
    row = corr.score(nets, bootstrap=0)[0]  # the network without φ is left out of φ's scores only
    assert row["networks"] == 3 and row["kendall_tau"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a zoo table"):
        corr.read_table(path)
    with pytest.raises(ValueError, match=r"no column\(s\) \['depth'\]"):
        corr.read_table(path, hparams=["depth"])


def _zoo_table(path: Path, seeds: int = 2) -> Path:
    """A zoo-shaped runs.csv: lr × batch_size × seeds; λ_max follows the gap, `noise` does not."""
    rng = np.random.default_rng(5)
    rows = []
    for k, (lr, b, s) in enumerate(itertools.product(["0.005", "0.02"], ["32", "128"], range(seeds))):
        gap = 0.1 + 0.2 * (lr == "0.02") + 0.1 * (b == "128") + rng.normal(0, 0.01)
        rows.append({"run": f"r{k}", "index": k, "lr": lr, "batch_size": b, "seed": s, "status": "complete",
                     "reason": "", "epochs": 4, "steps": 10, "train_loss": 0.5, "train_accuracy": 0.9,
                     "test_loss": 1.0, "test_accuracy": 0.9 - gap, "hessian_top1": 10 * gap + rng.normal(0, 0.1),
                     "noise": rng.normal()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.slow  # end to end: ≥ 1.5 s on 2 cores (the fast suite stays under a minute)
def test_zoo_analyze_writes_scores_a_table_and_a_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from minima.zoo import main

    from .helpers import assert_drawn

    study = tmp_path / "study"
    _zoo_table(study / "runs.csv")
    assert main(["analyze", str(study), "--test-images", "1000", "--bootstrap", "50"]) == 0
    out = study / "analysis"
    with open(out / "scores.csv") as f:
        scores = {r["measure"]: r for r in csv.DictReader(f)}
    assert set(scores) == {"hessian_top1", "noise"}  # the seed is not a measure, nor a hyper-parameter
    assert float(scores["hessian_top1"]["kendall_tau"]) > 0.5 > abs(float(scores["noise"]["kendall_tau"]))
    assert "psi_lr" in scores["noise"] and "psi_seed" not in scores["noise"]
    assert "| hessian_top1 |" in (out / "scores.md").read_text() and "8 networks" in capsys.readouterr().out
    assert_drawn(out / "correlations.png")


@pytest.mark.parametrize(("argv", "message"), [
    (["missing_dir"], "does not exist"),
    (["TABLE", "--hparams", "lr,depth"], "no column(s) ['depth']"),
    (["TABLE", "--color", "width"], "--color width: not one of the hyper-parameters"),
])
def test_zoo_analyze_refuses_in_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            argv: list[str], message: str) -> None:
    from minima.zoo import main

    table = _zoo_table(tmp_path / "t.csv")
    argv = [str(table) if a == "TABLE" else str(tmp_path / a) if a == "missing_dir" else a for a in argv]
    assert main(["analyze", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t_analysis").exists()


def test_a_zoo_run_is_converged_when_its_stopping_rule_says_it_reached_the_target() -> None:
    from minima.pipelines.runs import converged
    from minima.studies.train import TrainConfig

    target = TrainConfig(target_loss=0.01)
    assert converged(target, "complete", "training loss 0.0098 ≤ target 0.01") == "yes"
    assert converged(target, "complete", "epoch cap 30") == "no"
    assert converged(TrainConfig(target_accuracy=0.99), "complete", "training accuracy 0.9912 ≥ target 0.99") == "yes"
    assert converged(TrainConfig(), "complete", "epoch cap 30") == ""  # no target asked for
    assert converged(target, "diverged", "training loss became NaN") == ""
