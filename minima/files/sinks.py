"""Tracking sinks: a training run's per-epoch metrics and probe values mirrored to TensorBoard, Weights & Biases or
MLflow as they are written. The run directory (``minima.files.rundir``) stays the source of truth; a sink only
copies what the run records, under the optimiser step as its step.

* ``tensorboard``: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``; needs the ``tensorboard``
  package: ``pip install 'minima[tensorboard]'``);
* ``wandb``: a W&B run with the resolved training request as its config, its files under ``RUN/wandb/``, its id
  derived from the run directory so a resume continues it; ``WANDB_MODE=offline`` keeps it on disk
  (``pip install 'minima[wandb]'``);
* ``mlflow``: an MLflow run in ``$MLFLOW_TRACKING_URI`` (a server or database) or else the ``file:`` store
  ``RUN/mlruns`` (which MLflow 3 keeps in maintenance mode and refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is set: the
  sink sets it around its own calls and restores it), the request's settings as parameters (``pip install
  'minima[mlflow]'``).

Metric names: ``train/loss``, ``train/accuracy``, ``test/loss``, ``test/accuracy``, ``lr``, ``images_per_s``,
``probe/<name>`` and ``probe/<name>_threshold``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from minima.core.vocab import Sink, check_choice

EXTRA = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
         "mlflow": ("mlflow", "mlflow")}  # sink → (module it imports, the extra that installs it)
EPOCH_NAMES = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "test_loss": "test/loss",
               "test_accuracy": "test/accuracy", "lr": "lr", "images_per_s": "images_per_s"}


class TrackingSink(Protocol):
    """What a tracking sink does: take scalar values at a step, and close with the run's final state."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` (name → number) at optimiser step ``step``."""

    def close(self, state: str) -> None:
        """Finish the tracker's run, recording the run directory's final ``state``."""


def check_sinks(names: Sequence[str]) -> None:
    """Refuse an unknown sink or one whose package is missing, in one line naming the extra to install."""
    for name in names:
        check_choice("tracking sink (--log)", name, Sink)
        module, extra = EXTRA[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ValueError(f"--log {name} needs the {module} package: pip install 'minima[{extra}]'") from None


def epoch_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` row under the sinks' names (finite values only)."""
    return {EPOCH_NAMES[k]: float(v) for k, v in metrics.items()
            if k in EPOCH_NAMES and isinstance(v, int | float) and math.isfinite(v)}


def probe_values(name: str, value: float, threshold: float) -> dict[str, float]:
    """A probe's value and threshold as sink scalars ``probe/<name>`` and ``probe/<name>_threshold`` (non-finite
    ones left out).

    >>> probe_values("hessian", 76.5, float("inf"))
    {'probe/hessian': 76.5}
    """
    out = {f"probe/{name}": float(value)} if math.isfinite(value) else {}
    if math.isfinite(threshold):
        out[f"probe/{name}_threshold"] = float(threshold)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(config.items())))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, state: str) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minima"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=dict(config), resume="allow", reinit="create_new")

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "complete" else 1)


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        with self._store():
            self.client = mlflow.MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name("minima")
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment("minima"))
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            for key, value in sorted(config.items()):
                self.client.log_param(self.run_id, key, str(value)[:500])

    @contextlib.contextmanager
    def _store(self) -> Iterator[None]:
        """MLflow 3 refuses its ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set (it is in maintenance mode,
        still readable by every MLflow): set for the sink's own calls to the default store, restored after."""
        if not self.uri.startswith("file:"):
            yield
            return
        before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        try:
            yield
        finally:
            if before is None:
                del os.environ["MLFLOW_ALLOW_FILE_STORE"]
            else:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = before

    def log(self, values: Mapping[str, float], step: int) -> None:
        with self._store():
            for key, value in values.items():
                self.client.log_metric(self.run_id, key, value, step=step)

    def close(self, state: str) -> None:
        with self._store():
            self.client.set_terminated(self.run_id, "FINISHED" if state == "complete" else "FAILED")


def open_sinks(names: Sequence[str], run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> list[TrackingSink]:
    """The sinks named (after :func:`check_sinks`), each opened for the run in ``run_dir``."""
    check_sinks(names)
    kinds = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
    return [kinds[name](Path(run_dir), config) for name in names]
