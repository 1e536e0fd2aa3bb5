"""Declared pipelines: nested presets over the library's requests with overrides, stage plans, shards, dry runs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments import batch_sweep, connectivity, edge_of_stability, flat_optimizers, keskar, li_surfaces
from minima.core.config import setting
from minima.pipelines import declared
from minima.pipelines.declared import Section, Spec
from minima.pipelines.stages import Rates, Runner, Stage, describe, plan, shard
from minima.studies.train import TrainConfig

PIPELINES = (keskar, batch_sweep, li_surfaces, connectivity, edge_of_stability, flat_optimizers)


@dataclass(frozen=True)
class Own:
    seeds: int = setting(1, "seeds")
    sizes: tuple[int, ...] = setting((1, 2), "sizes")


SPEC = Spec("toy", Own, {"train": Section(TrainConfig, {"lr": 0.5, "epochs": 3}, frozenset({"out", "seed"}))})


def _preset(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "toy_mine.toml"
    path.write_text(text)
    return path


def test_a_preset_layers_base_toml_and_overrides(tmp_path: Path) -> None:
    _preset(tmp_path, "seeds = 3\n[train]\nepochs = 7\nmodel_kwargs = { widths = [4] }\n")
    p = declared.load(SPEC, tmp_path, "mine", ["train.lr=0.05", "train.patience=none", "sizes=4/8",
                                               'train.model_kwargs={"widths": [8]}', "train.optimizer=sgd"])
    assert p.name == "mine" and p.own.seeds == 3 and p.own.sizes == (4, 8)
    t = p.values("train")
    assert t["lr"] == 0.05 and t["epochs"] == 7 and t["patience"] is None and t["model_kwargs"] == {"widths": [8]}
    config = p.request("train", out="somewhere", seed=2)
    assert isinstance(config, TrainConfig) and config.lr == 0.05 and config.optimizer == "sgd" and config.seed == 2
    assert config.momentum == TrainConfig().momentum  # a field no layer names keeps the request's own default
    assert p.to_dict()["train"]["lr"] == 0.05


@pytest.mark.parametrize(("where", "text", "override", "message"), [
    ("override", "", "train.lrr=0.1", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("override", "", "sed=2", "unknown key 'sed'; did you mean 'seeds'?"),
    ("override", "", "train.seed=2", "train.seed is set by the toy pipeline for each stage"),
    ("override", "", "train.lr", "write KEY=VALUE"),
    ("override", "", "train.epochs=many", "'many'"),
    ("toml", "epochs = 3\n", None, "unknown key 'epochs'; did you mean 'train.epochs'?"),
    ("toml", "[trian]\nlr = 1\n", None, "unknown key 'trian'"),
    ("toml", "[train]\nout = 'x'\n", None, "train.out is set by the toy pipeline"),
])
def test_unknown_and_owned_keys_are_refused_in_one_line(tmp_path: Path, where: str, text: str, override: str | None,
                                                        message: str) -> None:
    _preset(tmp_path, text)
    with pytest.raises(ValueError, match=None) as err:
        declared.load(SPEC, tmp_path, "mine", [override] if override else [])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_missing_preset_lists_the_names(tmp_path: Path) -> None:
    _preset(tmp_path)
    with pytest.raises(ValueError, match=r"no preset 'other': give one of \['mine'\]"):
        declared.load(SPEC, tmp_path, "other")


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda m: m.__name__.split(".")[-1])
def test_every_shipped_preset_resolves(pipeline) -> None:
    for path in sorted(pipeline.PIPELINE.configs.glob(f"{pipeline.SPEC.name}_*.toml")):
        p = pipeline.PIPELINE.load(path.stem[len(pipeline.SPEC.name) + 1:])
        assert set(p.sections) == set(pipeline.SPEC.sections)


def _stages(log: list[str], groups: dict[str, int], done: set[str]) -> list[Stage]:
    out = []
    for g, n in groups.items():
        names = [f"{g}/{k}" for k in range(n)]
        for k, name in enumerate(names):
            out.append(Stage(name, g, lambda name=name: name in done,
                             lambda name=name: (log.append(name), done.add(name)),
                             lambda r: 10.0, tuple(names[:k])))
    return out


def test_a_complete_plan_runs_nothing_and_a_partial_one_only_the_rest(tmp_path: Path) -> None:
    log: list[str] = []
    done = {"a/0", "a/1", "b/0"}
    stages = _stages(log, {"a": 2, "b": 2}, done)
    assert plan(stages) == {"a/0": True, "a/1": True, "b/0": True, "b/1": False}
    assert log == []  # planning reads only
    runner = Runner("toy", tmp_path / "seconds.json")
    assert runner.run(stages) and log == ["b/1"] and runner.complete
    assert Runner("toy", tmp_path / "seconds.json").run(stages) and log == ["b/1"]  # complete: nothing runs
    assert set(Runner("toy", tmp_path / "seconds.json").seconds) == {"b/1"}  # the recorded time is kept


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_split_the_groups_disjointly_and_completely(n: int) -> None:
    stages = _stages([], {f"seed{s}": 3 for s in range(4)}, set())
    parts = [shard(stages, k, n) for k in range(1, n + 1)]
    names = [s.name for part in parts for s in part]
    assert sorted(names) == sorted(s.name for s in stages)  # every stage once
    for a, b in itertools.combinations(parts, 2):
        assert not {s.group for s in a} & {s.group for s in b}  # a group is never split
    for part in parts:  # each shard keeps the plan's order
        assert [s.name for s in part] == [s.name for s in stages if s in part]


def test_a_stage_waiting_for_another_shard_is_skipped_with_a_line(capsys: pytest.CaptureFixture) -> None:
    log: list[str] = []
    stages = _stages(log, {"a": 1}, set())
    stages.append(Stage("summary", "b", lambda: "summary" in log, lambda: log.append("summary"), None, ("a/0",)))
    runner = Runner("toy")
    assert not runner.run(stages, shard(stages, 2, 2))
    assert log == [] and "waits for a/0 (another shard's stage)" in capsys.readouterr().out
    assert runner.run(stages, shard(stages, 1, 2)) is False and log == ["a/0"]
    assert runner.run(stages, shard(stages, 2, 2)) and log == ["a/0", "summary"]


def test_the_dry_run_text_has_every_stage_its_shard_and_the_total() -> None:
    stages = _stages([], {"seed0": 2, "seed1": 2}, {"seed0/0"})
    text = describe("toy", stages, plan(stages), Rates(forward=1e-6, train=3e-6), n_shards=2)
    assert "4 stage(s), 1 complete" in text and "seed0/0" in text and "complete" in text
    assert "[shard 2/2]" in text and "estimate: about 30 s for 3 stage(s)" in text
    assert "per shard: 1/2 10 s, 2/2 20 s" in text


def test_rates_price_the_work_of_a_measurement() -> None:
    r = Rates(forward=1.0, train=3.0, overheads={"lbfgsb": 5.0})
    assert r.measurement({"f": 2, "grad": 1, "hvp": 1, "lbfgsb": 1, "grad_image": 4}, images=10) == (
        2 * 10 * 1.0 + 10 * 3.0 + 2 * 10 * 3.0 + 5.0 + 4 * 3.0)
    assert r.training(epochs=2, train_images=10, test_images=5) == 2 * (10 * 3.0 + 5 * 1.0)


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k"
    assert keskar.main(["--preset", "smoke", "--out", str(out), "--dry-run", "seeds=2", "--shard", "1/2"]) == 0
    text = capsys.readouterr().out
    assert not out.exists() and not tmp_path.joinpath("runs").exists()
    assert "12 stage(s), 0 complete, in 2 shards by seed0, seed1" in text and "seed1/evaluate" in text
    assert "estimate: about" in text and "per shard: 1/2" in text


@pytest.mark.parametrize("argv", [["train.lrr=0.1"], ["sharpness.checkpoints=a.pt"], ["--preset", "mini"]])
def test_a_refused_preset_is_exit_2_before_anything_is_written(tmp_path: Path, argv: list[str],
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "k"
    assert keskar.main(["--preset", "smoke", "--out", str(out), *argv]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[experiments.keskar] error:"), err


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda m: m.__name__.split(".")[-1])
def test_help_says_how_long_the_presets_take_and_what_runs_first(pipeline, capsys: pytest.CaptureFixture) -> None:
    """Issue 30 item 3: each pipeline's --help ends with its docstring — the presets' commands with their time on 2
    CPU cores, and (for those that need another pipeline's runs) what it trains first."""
    with pytest.raises(SystemExit):
        pipeline.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset quick" in text and "2 CPU cores" in text, text[-600:]
    if pipeline in (li_surfaces, connectivity):
        assert "first when its run directory" in text or "trained first" in text, text[-900:]
