"""PAC-Bayes σ search on a model whose accuracy under noise is known in closed form, and the registered metric."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy.stats import norm
from torch import nn

from minima.curvature import pacbayes
from minima.curvature.pacbayes import SigmaSearch


def _planted(a: float = 0.5) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """logit₀ − logit₁ = (w₀ − w₁)·x = 2a on every image (x = 1, label 0): under δ ~ N(0, σ²) per weight the
    network is right on all of them with probability Φ(2a / (σ√2)) and wrong on all of them otherwise."""
    net = nn.Sequential(nn.Linear(1, 2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[a], [-a]], dtype=torch.float64))
    return net.eval(), [(torch.ones(8, 1, dtype=torch.float64), torch.zeros(8, dtype=torch.long))]


def test_the_search_finds_the_planted_sigma_and_the_drop_grows_with_it() -> None:
    a = 0.5
    net, batches = _planted(a)
    search = SigmaSearch(draws=20_000)  # Monte-Carlo error of the mean accuracy ≈ 0.002, the tolerance 0.01
    g = torch.Generator().manual_seed(0)
    drops = [1 - pacbayes.perturbed_accuracy(net, batches, s, search, g) for s in (0.1, 0.3, 0.6, 1.0, 1.5)]
    assert drops == sorted(drops) and drops[0] < 0.01 and drops[-1] > 0.3  # monotone in σ
    for s in (0.3, 1.0):
        assert 1 - drops[(0.1, 0.3, 0.6, 1.0, 1.5).index(s)] == pytest.approx(norm.cdf(2 * a / (s * math.sqrt(2))),
                                                                              abs=0.03)
    found = pacbayes.search_sigma(lambda s: pacbayes.perturbed_accuracy(net, batches, s, search, g), 1.0, search)
    # a drop of 0.1 ± 0.01: Φ(√2·a/σ) ∈ [0.89, 0.91]
    low, high = math.sqrt(2) * a / norm.ppf(0.91), math.sqrt(2) * a / norm.ppf(0.89)
    assert low * 0.97 <= found <= high * 1.03, (low, found, high)


def test_the_authors_convention_draws_with_sigma_squared_as_the_deviation() -> None:
    net, batches = _planted()
    paper, authors = SigmaSearch(draws=20_000), SigmaSearch(draws=20_000, convention="authors")
    g = torch.Generator().manual_seed(1)
    sigma = pacbayes.search_sigma(lambda s: pacbayes.perturbed_accuracy(net, batches, s, paper, g), 1.0, paper)
    theirs = pacbayes.search_sigma(lambda s: pacbayes.perturbed_accuracy(net, batches, s, authors, g), 1.0, authors)
    low, high = math.sqrt(2) * 0.5 / norm.ppf(0.91), math.sqrt(2) * 0.5 / norm.ppf(0.89)  # σ of a drop 0.1 ± 0.01
    assert low * 0.95 <= sigma <= high * 1.03  # the noise deviation is σ …
    assert low * 0.95 <= theirs ** 2 <= high * 1.03 and theirs > 1.2 * high  # … or σ² in their code


def test_the_bounds_follow_from_sigma(tmp_path: Path) -> None:
    net, batches = _planted()
    init = _planted(0.1)[0]
    found = pacbayes.measures(net, batches, 8, seed=0, init=init, search=SigmaSearch(draws=200), adjust=False)
    s, s_mag = found["sigma"], found["sigma_mag"]
    assert found["pacbayes_flatness"] == pytest.approx(1 / s ** 2)
    assert found["pacbayes_orig"] == pytest.approx(0.5 / (4 * s ** 2) + math.log(8 / s) + 10)  # ‖w‖² = 2·0.5²
    assert found["pacbayes_init"] == pytest.approx(2 * 0.4 ** 2 / (4 * s ** 2) + math.log(8 / s) + 10)
    eps = pacbayes.MAG_EPS
    expected = 0.25 * 2 * math.log((eps ** 2 + (s_mag ** 2 + 1) * 0.5 / 2) / (eps ** 2 + s_mag ** 2 * 0.4 ** 2))
    assert found["pacbayes_mag_orig"] == pytest.approx(expected + math.log(8 / s_mag) + 10)
    adjusted = pacbayes.measures(net, batches, 8, seed=0, init=init, search=SigmaSearch(draws=200))
    assert adjusted["pacbayes_orig"] == pytest.approx(math.sqrt(found["pacbayes_orig"] / 8))


def test_the_pacbayes_metric_runs_on_a_checkpoint_and_refuses_without_init(tmp_path: Path) -> None:
    from minima.files import results
    from minima.studies.sharpness import measure, measure_request_type
    from tests.test_norms import _toy_run

    final = _toy_run(tmp_path)
    request = measure_request_type()
    out = measure(request(checkpoints=[final], metrics=["pacbayes"], pacbayes_init=str(final.parent / "init.pt"),
                          pacbayes_draws=4, pacbayes_depth=6, out=tmp_path / "p.h5"))
    rows = {r["metric"]: r for r in results.load_sharpness(out)}
    assert set(rows) == set(pacbayes.MEASURES) and rows["pacbayes_orig"]["convention"] == "paper"
    assert 0 < rows["pacbayes_flatness"]["sigma"] <= 2
    with pytest.raises(ValueError, match="need the initial weights: --pacbayes-init"):
        measure(request(checkpoints=[final], metrics=["pacbayes"], pacbayes_measures=("pacbayes_init",),
                        out=tmp_path / "x.h5"))
