"""One run of a study, from start to measured: train (resuming what a run directory holds), evaluate ``final.pt``
exactly on its own training and test data, measure it; and the study's tidy table of every run.

What a run directory holds beyond the training run's own files (``minima.files.rundir``):
``evaluation.json`` (the final weights' exact loss and accuracy, train and test, in eval mode: the numbers a
generalisation gap is made of), ``measure-<key>.h5`` (a ``minima.sharpness`` file per measurement request, so studies
with other requests never overwrite each other's results), ``log.txt`` (what the run printed) and ``.lock`` (held
while a process works on the run: a second process waits instead of writing beside it).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima.core import config as cfg
from minima.data import load_for_checkpoint
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.files.rundir import RunDir, write_text_atomic
from minima.geometry.evaluate import Batching, evaluate, recorded_loss
from minima.models import own_import
from minima.optim.steps import TrainingInterrupted
from minima.pipelines.study import RunSpec, Study
from minima.studies.sharpness import measure, measure_request_type, result_jobs
from minima.studies.train import NonFiniteLossError, reached_target, train

TABLE_FIXED = ("run", "index")
ZOO_ERROR = "zoo_error.json"  # a failure of the study's own work on a run (evaluation, measurement, a refused request)
TABLE_OUTCOME = ("status", "reason", "converged", "epochs", "steps", "train_loss", "train_accuracy", "test_loss",
                 "test_accuracy")
LOSS_TARGETS = (0.1, 0.01)  # Jiang et al.'s optimisation measures: steps to these training cross-entropies


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` (an exclusive ``flock``, released when the process ends, however it ends)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def idle(directory: Path) -> Iterator[bool]:
    """Whether no process is working on the run now; while it is idle, a shared lock on its ``.lock`` keeps a worker
    from starting on it until the block ends. A reader of a run's files (the table, the status) reads them inside:
    a measurement file open for writing in a worker must not be opened here (HDF5 locks it, and the worker's write
    would fail)."""
    lock = directory / ".lock"
    if not lock.exists():
        yield True
        return
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything this process prints (Python's ``sys.stdout``/``sys.stderr`` and C's file descriptors 1 and 2)
    appended to ``path``; restored after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            log.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def measure_path(spec: RunSpec, study: Study) -> Path:
    """The run's measurement file for this study's measure request (named by its key, so two requests never mix)."""
    return spec.directory / f"measure-{study.measure_key()}.h5"


def _measure_request(spec: RunSpec, study: Study) -> Any:
    settings = {**study.measure, "checkpoints": [str(RunDir(spec.directory).final)],
                "out": str(measure_path(spec, study)), "device": spec.config.device,
                "trust_import": [*study.measure.get("trust_import", ()), *own_import(spec.config.model)]}
    for metric, field in (("norms", "norms_init"), ("pacbayes", "pacbayes_init")):
        if metric in study.measure.get("metrics", ()) and not study.measure.get(field):
            settings[field] = str(RunDir(spec.directory).init)  # the measures from initialisation: its own x0
    return cfg.resolve(measure_request_type(), None, settings)


def measurements(path: Path) -> list[dict[str, Any]] | None:
    """The results in a run's measurement file: [] when there is none yet, None when it does not open (a process
    killed while writing it leaves such a file: it counts as not measured, and is measured again)."""
    if not path.exists():
        return []
    try:
        return results.load_sharpness(path)
    except (OSError, KeyError, ValueError):
        return None


def measured(spec: RunSpec, study: Study) -> bool:
    """Whether every result the study measures is in the run's measurement file (True when it measures nothing)."""
    if not study.measure:
        return True
    have = {r["metric"] for r in measurements(measure_path(spec, study)) or []}
    return all(name in have for _, name, _ in result_jobs(_measure_request(spec, study)))


def _set_aside_if_unreadable(path: Path) -> None:
    """A measurement file that does not open is renamed ``*.unreadable`` (kept for a look) so the measurement starts
    again."""
    if measurements(path) is None:
        path.rename(path.with_name(path.name + ".unreadable"))
        print(f"[minima.zoo] {path} could not be read (written by a process that was killed?); kept as "
              f"{path.name}.unreadable and measured again", flush=True)


def evaluation_path(directory: Path, weights: str = "final") -> Path:
    """Where :func:`evaluate_run` keeps a run's evaluation: ``evaluation.json`` of ``final.pt``, else
    ``evaluation-<weights>.json`` (``swa``: of ``swa.pt``)."""
    return directory / ("evaluation.json" if weights == "final" else f"evaluation-{weights}.json")


def evaluate_run(directory: Path, trust_import: Sequence[str] = (), eval_batch_size: int = 1000,
                 data_root: str | None = None, weights: str = "final") -> dict[str, float]:
    """A run directory's final weights (``weights="swa"``: its ``swa.pt``): exact loss and accuracy on the run's own
    training and test data (as its checkpoint records them; eval mode, its loss), computed once into
    ``evaluation.json`` (``evaluation-swa.json``) and read from it after — so a pipeline's summary or a zoo's table
    never evaluates a checkpoint twice."""
    path = evaluation_path(directory, weights)
    if path.exists():
        return json.loads(path.read_text())
    ckpt = ckpt_io.load_checkpoint(RunDir(directory).final if weights == "final" else directory / f"{weights}.pt")
    model = ckpt_io.model_from_checkpoint(ckpt, trust_import)
    meta = ckpt["meta"]
    ds = load_for_checkpoint(meta["data"], root=data_root)
    feed = Batching(eval_batch_size)
    found: dict[str, float] = {}
    for name, split in (("train", ds.train), ("test", ds.test)):
        r = evaluate(model, split, meta["data"]["mean"], meta["data"]["std"], feed, loss=recorded_loss(meta))
        found[f"{name}_loss"], found[f"{name}_accuracy"] = r.loss, r.accuracy
    write_text_atomic(path, json.dumps(found, indent=2) + "\n")
    return found


def evaluate_final(spec: RunSpec) -> dict[str, float]:
    """A zoo run's :func:`evaluate_run` (the study named its model: importing it is allowed)."""
    return evaluate_run(spec.directory, own_import(spec.config.model), spec.config.eval_batch_size,
                        spec.config.data_root)


def complete(spec: RunSpec, study: Study) -> bool:
    """Whether nothing is left to do for the run: trained (or diverged), evaluated, measured."""
    status = RunDir(spec.directory).status()
    if status.state == "diverged":
        return True
    return (status.state == "complete" and (spec.directory / "evaluation.json").exists()
            and measured(spec, study))


def _under_submitit() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR", "") == "slurm"


def zoo_state(spec: RunSpec, study: Study) -> tuple[str, str | None, int, int]:
    """Where a run stands for a study: (state, reason, epochs, steps). The training run's own ``status.json``, except
    that a failure of the study's own work (the evaluation, the measurement, or a training request refused before
    it started) is read from ``zoo_error.json`` — the training run's record is never overwritten by it — and a run
    trained but not yet evaluated or measured is ``running``."""
    status = RunDir(spec.directory).status()
    with idle(spec.directory) as free:
        if not free:  # a worker is on it: its files are being written
            return "running", status.reason, status.epoch, status.step
        done = complete(spec, study)
    error = spec.directory / ZOO_ERROR
    if not done and error.exists() and status.state in ("new", "complete"):
        return "failed", json.loads(error.read_text())["reason"], status.epoch, status.step
    if not done and status.state == "complete":
        return "running", status.reason, status.epoch, status.step
    return ("pending" if status.state == "new" else status.state), status.reason, status.epoch, status.step


def run_one(spec: RunSpec, study: Study, threads: int | None = None) -> dict[str, Any]:
    """Train, evaluate and measure one run, resuming whatever its directory already holds; everything it prints goes
    to its ``log.txt``. Returns ``{"run", "state", "reason", "seconds"}``; a failure is recorded (training's in its
    ``status.json``, the study's own work's in ``zoo_error.json``), never raised, so one failing run stops no other;
    the next start tries a failed run again."""
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_one(spec, study, t0)
    finally:
        torch.set_num_threads(threads_before)  # the caller's setting (run_one also runs in the caller's process)


def _run_one(spec: RunSpec, study: Study, t0: float) -> dict[str, Any]:
    directory = spec.directory
    interrupted = False
    with run_lock(directory), output_to(directory / "log.txt"):
        run = RunDir(directory)
        try:
            if not complete(spec, study):
                if not run.final.exists():
                    train(spec.config, resume=run.last.exists())
                evaluate_final(spec)
                if study.measure and not measured(spec, study):
                    _set_aside_if_unreadable(measure_path(spec, study))
                    measure(_measure_request(spec, study))
            (directory / ZOO_ERROR).unlink(missing_ok=True)
        except NonFiniteLossError:
            pass  # status.json says diverged, with its reason
        except (TrainingInterrupted, KeyboardInterrupt):
            interrupted = True
        except Exception as exc:
            said = f"{type(exc).__name__}: " + (str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            if run.status().state in ("new", "complete"):  # not the training's own failure: the study's work's
                write_text_atomic(directory / ZOO_ERROR, json.dumps({"reason": said}) + "\n")
            print(f"[minima.zoo] run {spec.run} failed: {said}", flush=True)
    state, reason, _, _ = zoo_state(spec, study)  # after the lock: zoo_state reads only a run nobody works on
    if interrupted and _under_submitit():
        # pre-emption under submitit (USR2): last.pt is written; hand the signal back to submitit's own handler,
        # which checkpoints this call (the same run, resumed) and requeues the job
        signal.raise_signal(signal.SIGUSR2)
    return {"run": spec.run, "state": "interrupted" if interrupted else state, "reason": reason,
            "seconds": time.perf_counter() - t0}


def converged(config: Any, state: str, reason: str | None) -> str:
    """Whether a complete run reached its training target (``--target-loss``/``--target-accuracy``: Jiang et al.'s
    protocol trains every network to cross-entropy 0.01): ``yes``, ``no`` (the epoch cap or the patience rule ended
    it first), or empty (no target asked for, or not complete)."""
    if state != "complete" or (config.target_loss is None and config.target_accuracy is None):
        return ""
    return "yes" if reached_target(reason) else "no"


def table_rows(study: Study) -> list[dict[str, Any]]:
    """One row per run: its hash and index, the settings that vary, status, reason and whether it reached its training
    target (:func:`converged`), epochs and steps, the final
    weights' exact train/test loss and accuracy, the steps to training losses 0.1 and 0.01 (empty when not reached),
    and every measured result's value (empty where not there yet)."""
    varied = study.varied
    rows = []
    names: list[str] = []
    for spec in study.runs:
        state, reason, epochs, steps = zoo_state(spec, study)
        row: dict[str, Any] = {"run": spec.run, "index": spec.index, **{k: spec.params.get(k, "") for k in varied},
                               "status": state, "reason": reason or "",
                               "converged": converged(spec.config, state, reason), "epochs": epochs, "steps": steps}
        with idle(spec.directory) as free:  # a run a worker is on gets its numbers in the next table
            evaluation = spec.directory / "evaluation.json"
            row.update(json.loads(evaluation.read_text()) if free and evaluation.exists() else {})
            if free and state == "complete":
                for target in LOSS_TARGETS:
                    row[f"steps_to_loss_{target:g}"] = RunDir(spec.directory).steps_to_loss(target)
            for r in (measurements(measure_path(spec, study)) or []) if free and study.measure else []:
                row[str(r["metric"])] = r["value"]  # none from a file a kill left half written
                if str(r["metric"]) not in names:
                    names.append(str(r["metric"]))
        rows.append(row)
    steps_to = [f"steps_to_loss_{t:g}" for t in LOSS_TARGETS]
    return [{k: "" if r.get(k) is None else r[k] for k in [*TABLE_FIXED, *varied, *TABLE_OUTCOME, *steps_to, *names]}
            for r in rows]


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return repr(float(value))  # every digit: the table round-trips the numbers exactly
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def write_table(study: Study, path: Path) -> Path:
    """``runs.csv`` (atomically): :func:`table_rows` as CSV, floats with every digit."""
    rows = table_rows(study)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(rows[0]) if rows else list(TABLE_FIXED))
    for row in rows:
        writer.writerow([_cell(v) for v in row.values()])
    write_text_atomic(path, buffer.getvalue())
    return path
