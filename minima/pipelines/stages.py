"""A pipeline as a list of stages: a side-effect-free plan, shards, a dry run with an estimate, and the runner.

A :class:`Stage` is one piece of work of a pipeline (train the SB network of seed 0, evaluate a line, measure
sharpness) with a ``done`` test that only reads files, the ``run`` that does the work (itself resumable: a training
stage from ``last.pt``, a grid from its finished points, a measurement from its finished results), an estimate of
its seconds from measured :class:`Rates`, and the stages whose outputs it reads (``needs``).

* :func:`plan` says which stages are complete — it reads, never writes, so a re-run that has nothing to compute
  computes nothing (the summary is drawn from files the stages wrote);
* :func:`shard` splits the stages over N machines by *group* (a seed, a batch size, …: stages of one group run on
  one shard in their order), disjointly and completely — the same ``K/N`` as ``minima.zoo --shard``;
* :func:`describe` is ``--dry-run``'s text: every stage, complete or to run, on which shard, with its estimate;
* :class:`Runner` runs a shard's stages in order, says ``stage k/N: name`` (``(complete, kept)`` when its output
  is complete), keeps each stage's seconds in ``stage_seconds.json`` (a re-run keeps them, a resumed stage adds
  to them, so a summary's compute time does not collapse), and skips a stage whose inputs another shard has not
  made yet, saying so.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minima.core.cli import duration
from minima.curvature.measures import keskar_overheads
from minima.files.rundir import write_text_atomic
from minima.models import build_model, own_import


@dataclass(frozen=True)
class Rates:
    """Seconds per image of the pipeline's network on this machine: ``forward`` (eval mode, no gradient — an
    evaluation) and ``train`` (train mode, forward and backward — a training step or a gradient of the loss). The
    unit every stage's estimate is written in: training ≈ epochs × images × ``train`` (+ its evaluations), a grid ≈
    points × images × ``forward``, a measurement ≈ its metric's passes (f: ``forward``, ∇f: ``train``, H·v: 2 ×
    ``train``) × images; ``overheads``: seconds per unit of the work of a measurement that is not the network's
    (Keskar's L-BFGS-B and random subspace: :func:`~minima.curvature.measures.keskar_overheads`)."""

    forward: float
    train: float
    overheads: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def for_network(cls, name: str, kwargs: Mapping[str, Any] | None, num_classes: int, input_shape: Sequence[int],
                    batch: int = 256, keskar: bool = False) -> Rates:
        """:meth:`measure` on the network ``name`` built as a run would build it (the import that naming one's own
        model allows included) for ``num_classes`` and images of ``input_shape``."""
        net = build_model(name, num_classes, trusted=own_import(name), **dict(kwargs or {}))
        return cls.measure(net, input_shape, batch, keskar)

    @classmethod
    def measure(cls, model: nn.Module, input_shape: Sequence[int], batch: int = 256, keskar: bool = False) -> Rates:
        """Timed on a copy of ``model`` with ``batch`` random inputs of ``input_shape`` (the faster of two timed
        passes after a warm-up: the first pays allocation and kernel selection). The model itself is untouched.
        ``keskar``: also time Keskar's L-BFGS-B and subspace work on the model's parameter count, for pipelines whose
        stages measure Keskar's sharpness (the random-subspace probe allocates columns of that length)."""
        work = copy.deepcopy(model)
        x = torch.randn(batch, *input_shape)
        y = torch.zeros(batch, dtype=torch.long)

        def timed(step: Callable[[], None]) -> float:
            step()
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - t0)
            return best / batch

        def forward() -> None:
            work.eval()
            with torch.no_grad():
                work(x)

        def train() -> None:
            work.train()
            work.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(work(x), y).backward()

        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return cls(forward=timed(forward), train=timed(train), overheads=keskar_overheads(n) if keskar else {})

    def training(self, epochs: int, train_images: int, test_images: int) -> float:
        """Seconds of ``epochs`` over ``train_images`` with a test evaluation after each (an upper bound when the
        run may stop early)."""
        return epochs * (train_images * self.train + test_images * self.forward)

    def grid(self, points: int, images: int) -> float:
        """Seconds of a grid of ``points``, each evaluated on ``images`` (train + test + BatchNorm re-estimation)."""
        return points * images * self.forward

    def measurement(self, passes: Mapping[str, int], images: int) -> float:
        """Seconds of a metric's ``passes`` (its cost model: ``f``, ``grad``, ``hvp`` over ``images``, ``grad_image``
        of one image, and the :attr:`overheads`' kinds); a kind with no rate counts as a gradient."""
        per = {"f": images * self.forward, "grad": images * self.train, "hvp": 2 * images * self.train,
               "grad_image": self.train, **self.overheads}
        return sum(n * per.get(kind, images * self.train) for kind, n in passes.items())


@dataclass(frozen=True)
class Stage:
    """One stage: its unique ``name`` (also its key in ``stage_seconds.json``), its ``group`` (the unit of sharding),
    a side-effect-free ``done``, the resumable ``run``, its estimated seconds from :class:`Rates` (``estimate``;
    None: no cost model) and the names of the stages whose outputs it reads (``needs``)."""

    name: str
    group: str
    done: Callable[[], bool]
    run: Callable[[], Any]
    estimate: Callable[[Rates], float] | None = None
    needs: tuple[str, ...] = ()


def plan(stages: Sequence[Stage]) -> dict[str, bool]:
    """Stage name → complete, in order; reads files only."""
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return {s.name: bool(s.done()) for s in stages}


def groups(stages: Sequence[Stage]) -> list[str]:
    """The stages' groups in order of first appearance."""
    return list(dict.fromkeys(s.group for s in stages))


def shard_of(stages: Sequence[Stage], n: int) -> dict[str, int]:
    """Group → its shard (1-based) of ``n``: the i-th group (from 0) goes to shard i mod n + 1."""
    return {g: i % n + 1 for i, g in enumerate(groups(stages))}


def shard(stages: Sequence[Stage], k: int, n: int) -> list[Stage]:
    """The stages of shard ``k`` of ``n`` (every stage is on exactly one shard; a group's stages on one)."""
    where = shard_of(stages, n)
    return [s for s in stages if where[s.group] == k]


def describe(pipeline: str, stages: Sequence[Stage], done: Mapping[str, bool], rates: Rates | None,
             n_shards: int = 1, recorded: Mapping[str, float] | None = None) -> str:
    """The dry run's text: each stage with ``done``/``to run``, its shard when split, and its estimate (from
    ``rates``; a stage without a cost model says so); then the whole job's estimate. ``recorded``: seconds a
    stage already spent (a resumed stage's estimate is not reduced by them — the estimate is of the whole stage)."""
    where = shard_of(stages, n_shards)
    lines = [f"[{pipeline}] plan: {len(stages)} stage(s), {sum(done.values())} complete"
             + (f", in {n_shards} shards by {', '.join(groups(stages))}" if n_shards > 1 else "")]
    total, unknown = 0.0, []
    per_shard: dict[int, float] = {}
    for s in stages:
        if done[s.name]:
            state = "complete"
        else:
            seconds = s.estimate(rates) if (s.estimate is not None and rates is not None) else None
            if seconds is None:
                unknown.append(s.name)
                state = "to run (no estimate)"
            else:
                total += seconds
                per_shard[where[s.group]] = per_shard.get(where[s.group], 0.0) + seconds
                state = f"to run, about {duration(seconds)}"
            if recorded and s.name in recorded:
                state += f" (resumes; {duration(recorded[s.name])} spent so far)"
        lines.append(f"  {s.name:<44} {state}" + (f"  [shard {where[s.group]}/{n_shards}]" if n_shards > 1 else ""))
    todo = [s for s in stages if not done[s.name]]
    if not todo:
        lines.append(f"[{pipeline}] nothing to compute: a run only writes the summary and figures from the files")
    else:
        lines.append(f"[{pipeline}] estimate: about {duration(total)} for {len(todo)} stage(s) on this machine"
                     + (f" (without {', '.join(unknown)}: no cost model)" if unknown else "")
                     + (" — per shard: " + ", ".join(f"{k}/{n_shards} {duration(v)}" for k, v in
                                                      sorted(per_shard.items())) if n_shards > 1 else "")
                     + "; training stages are counted to their epoch cap (an early stop is shorter)")
    return "\n".join(lines)


class Runner:
    """Runs stages in order with their clock: ``stage k/N: name`` on stdout, seconds in ``path``
    (``stage_seconds.json``; None: memory only)."""

    def __init__(self, pipeline: str, path: Path | None = None) -> None:
        self.pipeline, self.path = pipeline, path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.complete = False

    def run(self, stages: Sequence[Stage], selected: Sequence[Stage] | None = None) -> bool:
        """Run the ``selected`` stages (default: all) of ``stages`` in order, each skipped when complete or when a
        stage it needs is neither complete nor run here (another shard's); True when every stage of ``stages`` is
        complete afterwards (the summary can be drawn)."""
        selected = list(stages if selected is None else selected)
        mine = {s.name for s in selected}
        by_name = {s.name: s for s in stages}
        for k, s in enumerate(selected, start=1):
            head = f"[{self.pipeline}] stage {k}/{len(selected)}: {s.name}"
            if s.done():
                print(head + " (complete, kept)", flush=True)
                continue
            missing = [n for n in s.needs if not by_name[n].done()]
            if any(n not in mine for n in missing):
                print(f"{head} — waits for {', '.join(n for n in missing if n not in mine)} (another shard's "
                      "stage): run this shard again once that one is complete", flush=True)
                continue
            print(head, flush=True)
            t0 = time.perf_counter()
            try:
                s.run()
            finally:
                self.seconds[s.name] = self.seconds.get(s.name, 0.0) + time.perf_counter() - t0
                if self.path is not None:
                    write_text_atomic(self.path, json.dumps(self.seconds, indent=2) + "\n")
        self.complete = all(s.done() for s in stages)
        return self.complete

    @property
    def total(self) -> float:
        """Seconds of every stage, as recorded."""
        return sum(self.seconds.values())
