"""Curvature probes during training, as a callback of the one training loop (``studies/loop.py``).

:class:`ProbeCallback` owns everything about a run's probes: the :class:`~minima.curvature.probes.Prober` (one
objective on the fixed probe subset, the Lanczos warm starts), the timeline ``probes.h5`` (created, truncated to a
resumed ``last.pt``, every probe's history recorded, other settings refused on resume), which probes already ran at
the resumed step, the time probes take (kept out of images/s), what is printed, and what the tracking sinks get. The
trainer calls it at four places: when the run starts (:meth:`~ProbeCallback.restore`, then
:meth:`~ProbeCallback.open` on rank 0), after every optimiser step (:meth:`~ProbeCallback.after_step`), after the last
step (:meth:`~ProbeCallback.after_last_step`), and when it saves ``last.pt`` (:meth:`~ProbeCallback.resume_state`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minima import data as data_mod
from minima.core import distributed
from minima.core.allocator import memory_budget
from minima.core.precision import float32_math
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.probes import PRECONDITIONED, WARM_STARTABLE, Prober, parse_probes, stability_threshold
from minima.files import timeline
from minima.files.sinks import TrackingSink, probe_values
from minima.geometry.evaluate import Batching
from minima.optim.sam import sam_edge


@dataclass(frozen=True)
class ProbeSettings:
    """What a run's probes are: the requested probes (``NAME[:EVERY]``) and default period, the number of images and
    the seed of their stratified subset, BatchNorm mode, top-k, warm starts, and what their thresholds need (loss,
    optimiser, momentum, Adam's betas)."""

    probes: tuple[str, ...]
    every: int
    images: int
    subset_seed: int
    bn_mode: str
    topk: int
    warm_start: bool
    loss: str
    optimizer: str
    momentum: float
    betas: tuple[float, ...]
    eval_batch_size: int
    sam_rho: float | None = None  # SAM's radius: the probes also record SAM's edge λ_SAM (not for ASAM: no such form)

    def recorded(self) -> dict[str, Any]:
        """What every row of the timeline was measured with (a resume may not change it)."""
        out = {"subset": {"n": self.images, "seed": self.subset_seed}, "bn_mode": self.bn_mode, "topk": self.topk,
               "loss": self.loss, "optimizer": self.optimizer}
        return {**out, "sam_rho": self.sam_rho} if self.sam_rho is not None else out


FLAGS = {"subset": "--probe-subset/--subset-seed", "bn_mode": "--probe-bn-mode", "topk": "--probe-topk",
         "loss": "--loss", "optimizer": "--optimizer/--sam-base", "sam_rho": "--sam-rho"}


class ProbeCallback:
    """A run's probes (see the module docstring). Built on every rank before ``--sync-bn`` converts the model's
    BatchNorm in place: the probes' private copy normalises each probe batch by itself, with no collective inside a
    probe's forward."""

    def __init__(self, settings: ProbeSettings, model: nn.Module, train: data_mod.Split, mean: Sequence[float],
                 std: Sequence[float], env: distributed.DistEnv, steps_per_epoch: int, run_dir: Path) -> None:
        self.settings, self.env, self.path = settings, env, Path(run_dir) / "probes.h5"
        s = settings
        split = train if s.images == len(train) else train.take(
            data_mod.stratified_subset(train.labels, s.images, s.subset_seed))
        feed = Batching(min(s.eval_batch_size, s.images), env.device, torch.float32)
        batches = FixedBatches.from_split(split, mean, std, feed, rank=env.rank, world_size=env.world_size)
        obj = DatasetObjective(model, batches, bn=s.bn_mode, loss=s.loss,
                               hvp_cache_bytes=memory_budget(env.device) // 4)
        self.prober = Prober(obj, parse_probes(s.probes, s.every, s.optimizer, steps_per_epoch), s.topk,
                             warm_start=s.warm_start, grad_norm=s.sam_rho is not None)
        self.probed_at: dict[str, int] = {}  # probe → the last step it ran at
        self.seconds = 0.0  # probe time since it was last taken (kept out of images/s)
        self.said: dict[str, str] = {}  # rank 0: each probe's latest value against its threshold, until printed
        self.sinks: list[TrackingSink] = []

    def restore(self, state: dict[str, Any], step: int) -> None:
        """Resuming from ``last.pt`` (``state``) at ``step``: the warm starts, the existing timeline's settings checked
        (refused in one line when they differ), and the probes it already holds at ``step`` skipped (every rank
        reads the same file, so every rank skips the same ones)."""
        if self.prober.warm is not None:
            self.prober.warm.update(state.get("probe_warm_start", {}))
        if self.path.exists():
            done = timeline.load(self.path)
            self._check(done["_attrs"])
            self.probed_at = {p.name: step for p in self.prober.probes
                              if p.name in done and step in done[p.name]["step"].tolist()}

    def _check(self, have: dict[str, Any]) -> None:
        for key, want in self.settings.recorded().items():
            recorded = json.loads(have[key]) if key == "subset" else have.get(key)
            if recorded != want:
                raise ValueError(f"{self.path} was measured with {key} {recorded}, this resume asks for {want}; "
                                 f"resume with the same {FLAGS[key]} or move {self.path.name} aside to start a new "
                                 "timeline")

    def open(self, resumed: bool, step: int, sinks: list[TrackingSink]) -> None:
        """Rank 0: the timeline created (or, resuming, truncated to ``step``: later rows are measured again) with
        every probe's history recorded; probe values go to ``sinks`` too."""
        self.sinks = sinks
        if not (resumed and self.path.exists()):
            timeline.create(self.path, self.settings.recorded())
        timeline.truncate(self.path, step)
        timeline.record_probes(self.path, [{**p.record(), **({"warm_start": self.settings.warm_start}
                                                             if p.name in WARM_STARTABLE else {})}
                                           for p in self.prober.probes], step)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: float,
                   lr: float) -> None:
        """The probes due at ``step`` (every rank)."""
        due = self.prober.due(step)
        if due:
            self._run(due, model, optimizer, step, epoch, lr)

    def after_last_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: float,
                        lr: float) -> None:
        """Every probe that has not run at the last step, and the line that says them (rank 0)."""
        missing = [p for p in self.prober.probes if self.probed_at.get(p.name) != step]
        if missing:
            self._run(missing, model, optimizer, step, epoch, lr)
            if self.env.is_main:
                tqdm.write(f"[minima.train] probes after the last step ({step}): {self.take_said()}")

    def _run(self, due: list, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: float,
             lr: float) -> None:
        t0 = time.perf_counter()
        with float32_math("fp32"):  # probes in float32, whatever the training's TF32 setting; restored after
            found = self.prober.run(model, due, step, optimizer)
        self.seconds += time.perf_counter() - t0
        self.probed_at.update({p.name: step for p in due})
        if not self.env.is_main:
            return
        s = self.settings
        for name, result in found.items():
            threshold = stability_threshold(s.optimizer, lr, s.momentum, tuple(s.betas),
                                            preconditioned=name == PRECONDITIONED)
            edge = {}
            if s.sam_rho is not None and name != PRECONDITIONED:
                edge = {"sam_threshold": sam_edge(threshold, s.sam_rho, result["grad_norm"])}
            timeline.append(self.path, name, {"step": step, "epoch": epoch, "lr": lr, "threshold": threshold,
                                              **edge, **result})
            value = result["value"]
            for sink in self.sinks:
                sink.log(probe_values(name, value, threshold), step)
            self.said[name] = f"{name} {value:.4g}" + (
                f" ({value / threshold:.2f}× its threshold {threshold:.4g})" if math.isfinite(threshold) else "")
            if edge and math.isfinite(edge["sam_threshold"]):
                self.said[name] += f", {value / edge['sam_threshold']:.2f}× SAM's edge {edge['sam_threshold']:.4g}"

    def take_seconds(self) -> float:
        """Probe seconds since the last call (the epoch's, kept out of images/s)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def take_said(self) -> str:
        """The probe values measured since the last print (each probe's latest, against its threshold), then
        forgotten."""
        said, self.said = ", ".join(self.said.values()), {}
        return said

    def resume_state(self) -> dict[str, Any]:
        """What ``last.pt`` keeps so a resume starts the probes from the same numbers (the warm starts)."""
        return {"probe_warm_start": dict(self.prober.warm)} if self.prober.warm else {}
