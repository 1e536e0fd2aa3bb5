"""Results are keyed so that two checkpoints can never overwrite each other's results: labels made distinct within a
call, a file's existing label for another checkpoint refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from minima.files import results
from minima.files.naming import unique_labels
from minima.studies.sharpness import MeasureRequest, default_output, measure
from tests.helpers import toy_checkpoint, toy_dataset


def test_unique_labels_take_the_directories_above_until_they_differ(tmp_path: Path) -> None:
    paths = [tmp_path / "lr0.1/seed0/final.pt", tmp_path / "lr0.01/seed0/final.pt", tmp_path / "seed1/final.pt",
             tmp_path / "x/sb.pt", tmp_path / "y/sb.pt"]
    assert unique_labels(paths) == ["lr0.1-seed0", "lr0.01-seed0", "seed1", "x-sb", "y-sb"]
    assert unique_labels([tmp_path / "a/b/seed0/final.pt", tmp_path / "c/b/seed0/last.pt"]) == [
        "a-b-seed0", "c-b-seed0"]
    run = tmp_path / "run"
    assert unique_labels([run / "init.pt", run / "final.pt", run / "epoch_0010.pt", run / "last.pt"]) == [
        "run-init", "run", "run-epoch_0010", "run-last"]
    assert unique_labels([tmp_path / "a/run/init.pt", tmp_path / "b/run/init.pt"]) == ["a-run", "b-run"]
    with pytest.raises(ValueError, match="same checkpoint"):
        unique_labels([tmp_path / "a.pt", tmp_path / "." / "a.pt"])


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    ds = toy_dataset()
    for d in ("a", "b"):
        (tmp_path / d / "seed0").mkdir(parents=True)
    return (toy_checkpoint(tmp_path / "a" / "seed0" / "final.pt", 1, ds),
            toy_checkpoint(tmp_path / "b" / "seed0" / "final.pt", 2, ds))


def _request(paths: list[Path], out: Path) -> object:
    return MeasureRequest(checkpoints=[str(p) for p in paths], metrics=("average",), average_samples=2,
                          out=str(out), device="cpu", dtype="float64")


def test_two_runs_named_seed0_keep_both_results(tmp_path: Path) -> None:
    """The bug this guards: ``a/seed0/final.pt`` and ``b/seed0/final.pt`` were both ``seed0``; the second result
    overwrote the first and every re-run recomputed both."""
    a, b = _pair(tmp_path)
    assert default_output([a, b]).name == "a-seed0_b-seed0_sharpness.h5"
    out = tmp_path / "both.h5"
    measure(_request([a, b], out))
    rows = {r["checkpoint_label"]: r for r in results.load_sharpness(out)}
    assert sorted(rows) == ["a-seed0", "b-seed0"]
    assert Path(rows["a-seed0"]["checkpoint"]).resolve() == a.resolve()
    assert Path(rows["b-seed0"]["checkpoint"]).resolve() == b.resolve()
    assert rows["a-seed0"]["value"] != rows["b-seed0"]["value"]
    before = out.stat().st_mtime_ns
    measure(_request([a, b], out))  # everything recorded: nothing recomputed, the file untouched
    assert out.stat().st_mtime_ns == before


def test_a_label_held_for_another_checkpoint_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    out = tmp_path / "one.h5"
    measure(_request([a], out))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="already holds results labelled 'seed0' for another checkpoint"):
        measure(_request([b], out))
    assert out.read_bytes() == before


def test_one_runs_init_and_final_are_two_results(tmp_path: Path) -> None:
    ds = toy_dataset()
    (tmp_path / "run").mkdir()
    init = toy_checkpoint(tmp_path / "run" / "init.pt", 1, ds)
    final = toy_checkpoint(tmp_path / "run" / "final.pt", 2, ds)
    out = measure(_request([init, final], tmp_path / "both.h5"))
    assert sorted(r["checkpoint_label"] for r in results.load_sharpness(out)) == ["run", "run-init"]

