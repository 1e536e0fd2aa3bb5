"""Curvature measured during training: probes the trainer runs every K optimiser steps.

A probe is a registered metric (:mod:`minima.curvature.registry`; its first result, with the metric's default
parameters and ``topk`` eigenvalues for ``hessian``) or ``preconditioned``: λ_max of P^{-1/2} H P^{-1/2} with P the
Adam preconditioner diag(√v̂_t) + ε, v̂_t = v_t/(1 − β₂^t) (Cohen et al. 2022, "Adaptive gradient methods at the edge
of stability"), by Lanczos on the scaled Hessian-vector products. Every probe runs on one fixed, recorded stratified
subset of training images without augmentation, in its recorded BatchNorm mode, on one objective built once whose
weights and BatchNorm buffers are reloaded from the live model (no copy per probe); under torchrun every rank
computes its shard in lockstep. A probe's seed is the step it runs at, so an interrupted and resumed run measures
exactly what the uninterrupted one did.

Stability thresholds (what λ_max is compared with): 2/η for gradient descent, 2(1 + β)/η with heavy-ball momentum β,
(2 + 2β₁)/((1 − β₁)η) for Adam's preconditioned sharpness; under SAM also its own edge λ_SAM, which needs the
full-batch gradient norm on the probe subset (:class:`Prober` with ``grad_norm=True`` measures it once per probe step,
beside every probe's result).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minima.core.config import parse_setting
from minima.curvature.hessian import CountingOperator, hessian_operator, top_eigenvalues
from minima.curvature.objective import DatasetObjective
from minima.curvature.registry import MEASURED, REGISTRY, get_metric

PRECONDITIONED = "preconditioned"


PERIOD = re.compile(r"^\s*([+-]?\d+)\s*(steps?|epochs?)?\s*$")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: what (a metric name or ``preconditioned``) and every how many optimiser steps; ``every_epochs``
    when it was asked for in epochs (``every`` is then that many epochs' steps)."""

    name: str
    every: int
    every_epochs: int | None = None
    params: tuple[tuple[str, Any], ...] = ()  # the metric's parameters set for this probe (others: their defaults)

    def record(self) -> dict[str, Any]:
        """What a timeline records of the probe (JSON types; ``params`` only when some are set)."""
        out: dict[str, Any] = {"name": self.name, "every": self.every, "every_epochs": self.every_epochs}
        if self.params:
            out["params"] = json.loads(json.dumps(dict(self.params)))
        return out


def parse_probes(specs: tuple[str, ...] | list[str], default_every: int, optimizer: str,
                 steps_per_epoch: int = 1) -> list[ProbeSpec]:
    """``NAME``, ``NAME:EVERY``, ``NAME:EVERY:KEY=VALUE,…`` or ``NAME:KEY=VALUE,…`` per probe: EVERY in optimiser
    steps (``100``, ``100steps``) or epochs (``2epochs``: after the last step of every second epoch,
    ``steps_per_epoch`` steps each), default ``default_every`` steps; KEY a parameter of the metric, named as
    ``minima.sharpness``'s flag (``eig_tol`` or ``eig-tol``; several values of a tuple separated by ``/``). A
    ``ValueError`` in one line for an unknown name or parameter, a bad value, a period ≤ 0, or ``preconditioned``
    without Adam."""
    out = []
    for spec in specs:
        name, _, rest = str(spec).partition(":")
        every, _, settings = rest.partition(":")
        if "=" in every:  # NAME:KEY=VALUE (no period)
            every, settings = "", rest
        if name != PRECONDITIONED and name not in REGISTRY:
            raise ValueError(f"unknown probe {name!r}; choose a metric of {sorted(REGISTRY)} or {PRECONDITIONED!r}")
        match = PERIOD.match(every or str(default_every))
        if match is None:
            raise ValueError(f"probe {spec!r}: the period after ':' must be a whole number of steps (100) or epochs "
                             "(2epochs)")
        period, unit = int(match.group(1)), match.group(2) or "steps"
        if period <= 0:
            raise ValueError(f"probe {spec!r}: the period must be ≥ 1 {unit.rstrip('s')}, got {period}")
        if name == PRECONDITIONED and optimizer != "adam":
            raise ValueError("the preconditioned probe measures Adam's P^-1/2 H P^-1/2; with plain SGD the "
                             "preconditioner is the identity and it is λ_max — use --probe hessian")
        epochs = unit.startswith("epoch")
        params = _probe_params(name, settings, str(spec))
        if dict(params).get("eig_which") == "both":
            raise ValueError(f"probe {spec!r}: a probe measures one end of the spectrum; give eig_which=largest or "
                             "eig_which=smallest")
        out.append(ProbeSpec(name, period * steps_per_epoch if epochs else period, period if epochs else None,
                             params))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a probe is named twice in {list(specs)}; give each once (NAME:EVERY sets its period)")
    return out


def _probe_params(name: str, settings: str, spec: str) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE,…`` of a probe spec as the metric's typed parameters (in the metric's order)."""
    if not settings.strip():
        return ()
    known = {p.name: p for p in get_metric(name).params} if name != PRECONDITIONED else {}
    given: dict[str, Any] = {}
    for item in settings.split(","):
        key, eq, text = item.strip().partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"probe {spec!r}: {item.strip()!r} is not KEY=VALUE")
        if key not in known:
            choices = sorted(known) or "none (it has no parameters)"
            raise ValueError(f"probe {spec!r}: {name} has no parameter {key!r}; its parameters: {choices}")
        given[key] = parse_setting(known[key].type, text.strip(), f"probe {spec!r}: {key}")
    return tuple((k, given[k]) for k in known if k in given)


def stability_threshold(optimizer: str, lr: float, momentum: float = 0.0, betas: tuple[float, ...] = (0.9, 0.999),
                        preconditioned: bool = False) -> float:
    """The largest stable curvature at learning rate ``lr``: 2/η (GD), 2(1 + β)/η (heavy ball), and for Adam's
    preconditioned sharpness (2 + 2β₁)/((1 − β₁)η); NaN for Adam's raw λ_max (no threshold applies)."""
    if optimizer == "adam":
        return (2 + 2 * betas[0]) / ((1 - betas[0]) * lr) if preconditioned else float("nan")
    return 2 * (1 + momentum) / lr


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.Tensor | None:
    """diag(√v̂_t) + ε as a flat float64 vector in ``params``' order, or None before Adam's first step."""
    parts = []
    for group in optimizer.param_groups:
        _, beta2 = group["betas"]
        eps = group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                return None
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].to(torch.float64) / (1 - beta2 ** step)
            parts.append((p, v_hat.sqrt() + eps))
    by_param = {id(p): d for p, d in parts}
    return torch.cat([by_param[id(p)].reshape(-1) for p in params])


WARM_STARTABLE = ("hessian", PRECONDITIONED)


class Prober:
    """The probes of one training run: one objective on the probe subset, and :meth:`run` at a step.

    ``warm_start``: the ``hessian`` and ``preconditioned`` probes start Lanczos from their previous top Ritz vector
    (rounded to float32, the form :attr:`warm` keeps and a resumable checkpoint stores, so that a resumed run starts
    from the very numbers the uninterrupted one did); same tolerance, fewer Hessian-vector products."""

    def __init__(self, objective: DatasetObjective, probes: list[ProbeSpec], topk: int = 1,
                 warm_start: bool = False, grad_norm: bool = False) -> None:
        self.obj, self.probes, self.topk, self.grad_norm = objective, probes, topk, grad_norm
        self.warm: dict[str, torch.Tensor] | None = {} if warm_start else None

    def _keep(self, name: str, vector: Any) -> None:
        if self.warm is not None:
            self.warm[name] = torch.as_tensor(vector).to(torch.float32).cpu()

    def due(self, step: int) -> list[ProbeSpec]:
        """The probes whose period divides optimiser step ``step``."""
        return [p for p in self.probes if step % p.every == 0]

    def run(self, model: nn.Module, probes: list[ProbeSpec], step: int,
            optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
        """Each probe's result at the live ``model``'s weights and buffers (BatchNorm's running statistics, which
        ``eval`` mode uses): ``{name: {"value", "seconds", ["eigenvalues"], ["grad_norm"]}}``."""
        live = [p for p in model.parameters() if p.requires_grad]
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, buffer in self.obj.model.named_buffers():
                buffer.copy_(buffers[name])
        x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in live])
        x = x.to(self.obj.vector_device)
        self.obj.set_flat(x)
        if self.grad_norm:  # ‖∇L‖ of the full probe subset, once for every probe of this step
            f0, grad = self.obj.value_and_grad(x)
            norm = float(torch.linalg.vector_norm(grad))
        else:
            f0 = self.obj.value(x)
        out = {}
        for probe in probes:
            t0 = time.perf_counter()
            self.obj.set_flat(x)
            if probe.name == PRECONDITIONED:
                result = self._preconditioned(optimizer, live, step)
            else:
                metric = get_metric(probe.name)
                given = dict(probe.params)
                params = {p.name: given.get(p.name, self.topk if p.name == "topk" else p.default)
                          for p in metric.params} | {MEASURED: self.obj.count}
                _, job = metric.jobs(params)[0]
                if self.warm is not None and probe.name in WARM_STARTABLE:
                    job = {**job, "warm_start": self.warm.get(probe.name)}
                values = metric.compute(self.obj, x, f0, job, step)
                result = {"value": float(values["value"])}
                if "eigenvalues" in values:
                    result["eigenvalues"] = [float(v) for v in values["eigenvalues"]]
                if "hvps" in values:
                    result["hvps"] = int(values["hvps"])
                if "top_vector" in values:
                    self._keep(probe.name, values["top_vector"])
            result["seconds"] = time.perf_counter() - t0
            if self.grad_norm:
                result["grad_norm"] = norm
            out[probe.name] = result
        return out

    def _preconditioned(self, optimizer: torch.optim.Optimizer, live: list[nn.Parameter], step: int
                        ) -> dict[str, Any]:
        diag = adam_preconditioner(optimizer, live)
        if diag is None:
            return {"value": float("nan"), "eigenvalues": [float("nan")] * self.topk, "hvps": 0}
        scale = diag.to(self.obj.vector_device).rsqrt()
        hess = hessian_operator(self.obj)
        op = CountingOperator(self.obj.numel, lambda v: scale * hess.apply(scale * v), self.obj.vector_device)
        warm = self.warm is not None
        r = top_eigenvalues(op, k=self.topk, tol=1e-3, seed=step, return_vectors=warm,
                            warm_start=self.warm.get(PRECONDITIONED) if warm else None)
        if warm:
            self._keep(PRECONDITIONED, r.eigenvectors[:, 0])
        return {"value": float(r.eigenvalues[0]), "eigenvalues": [float(v) for v in r.eigenvalues], "hvps": r.hvps}
