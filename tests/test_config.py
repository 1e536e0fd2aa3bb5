from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from minima.core import config as cfg
from minima.train import TrainConfig, parse_args


def test_defaults_then_toml_then_flags(tmp_path: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text('model = "mlp"\nbatch_size = 5000\nmilestones = [30, 60]\nmodel_kwargs = {widths = [8]}\n')
    config, resume = parse_args(["--config", str(preset), "--batch-size", "256", "--no-progress"])
    assert not resume
    assert config.model == "mlp" and config.batch_size == 256 and config.milestones == (30, 60)
    assert config.model_kwargs == {"widths": [8]} and config.progress is False
    assert config.epochs == TrainConfig().epochs


def test_unknown_toml_key_lists_valid_keys(tmp_path: Path) -> None:
    preset = tmp_path / "bad.toml"
    preset.write_text("batchsize = 5\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['batchsize'\]; valid settings: .*batch_size"):
        parse_args(["--config", str(preset)])


def test_optional_none_and_tuples() -> None:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, TrainConfig)
    ns = parser.parse_args(["--micro-batch", "none", "--adam-betas", "0.8", "0.9", "--model-kwargs", '{"a": 1}'])
    c = cfg.resolve(TrainConfig, None, ns)
    assert c.micro_batch is None and c.adam_betas == (0.8, 0.9) and c.model_kwargs == {"a": 1}


def test_presets_load() -> None:
    """configs/*.toml are minima.train presets; configs/pipelines/*.toml are what the pipelines read."""
    from experiments import batch_sweep, keskar

    root = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    presets = sorted(root.glob("*.toml"))
    assert presets, "experiments/configs/ should hold the training presets"
    for path in presets:
        config = cfg.resolve(TrainConfig, path, {})
        assert config.batch_size in (256, 5000) or config.optimizer == "sgd"
    for name in ("quick", "smoke"):
        assert keskar.load_preset(name).sections != keskar.load_preset("paper").sections
    assert keskar.load_preset("paper").own.seeds == 5 and keskar.load_preset("quick").values("train")["epochs"] == 30
    assert batch_sweep.load_preset("quick").values("train")["train_subset"] == 20_000
    from experiments import connectivity, edge_of_stability, li_surfaces

    for name in ("paper", "quick", "smoke"):  # every pipeline preset resolves against its schema
        for pipeline in (li_surfaces, connectivity, edge_of_stability):
            pipeline.PIPELINE.load(name)
    assert connectivity.PIPELINE.load("paper").values("pair")["model"] == "vgg11"
    expected = [f"{pipeline}_{n}.toml" for pipeline in ("keskar", "batch_sweep", "li_surfaces", "connectivity",
                                                        "edge_of_stability", "flat_optimizers")
                for n in ("paper", "quick", "smoke")]
    assert sorted(p.name for p in (root / "pipelines").glob("*.toml")) == sorted(expected)
