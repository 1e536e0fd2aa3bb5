"""The toolkit's vocabularies: one ``Literal`` per kind of choice, shared by every request, function and flag.

* :data:`BNPolicy` — what BatchNorm does at a point of a path or grid that is not a trained checkpoint:
  ``recompute`` (reset and re-estimate the running statistics on training data), ``batch`` (normalise with each
  evaluation batch's statistics), ``interpolate`` (move the running statistics with the weights).
* :data:`BNRecord` — the BatchNorm policy a grid file records: a :data:`BNPolicy`, or ``none`` for a model without
  BatchNorm (not a choice anyone makes).
* :data:`BNMode` — how BatchNorm normalises inside one function evaluation: ``eval`` (running statistics) or
  ``batch`` (each fixed evaluation batch's own statistics, running buffers untouched).
* :data:`Dtype` — the floating-point type of evaluation: ``float32``, ``float64``, or ``bfloat16`` (autocast:
  parameters, BatchNorm statistics and sums stay float32/float64). :data:`CurvatureDtype` is the subset in which
  derivatives are taken.
* :data:`DeviceName` — ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` (under torchrun, GPU
  ``LOCAL_RANK``).
* :data:`DataOnDevice` — data placement: ``auto`` (on the device when it takes at most half its free memory),
  ``yes``, ``no`` (pinned host memory).
* :data:`Float32Math` — float32 matmuls/convolutions on CUDA: ``fp32`` (TF32 off), ``tf32``, ``default``.
* :data:`Direction` — the α line of ``minima.interpolate``: the ``segment`` A→B or a ``random`` direction.
* :data:`Norm`, :data:`Ignore` — normalisation of random directions (per filter, per layer, none) and what they
  do on 1-D parameters (zero on BatchNorm and biases, or no exception).
* :data:`EigenMethod` — ``lanczos`` (torch, full reorthogonalisation) or ``arpack`` (scipy ``eigsh``).
* :data:`ScalingRule`, :data:`ScheduleKind`, :data:`Optimizer`, :data:`SamBase`, :data:`Amp` — training: LR scaling
  with the batch, LR schedule, optimiser (``sam``/``asam``: sharpness-aware steps around a :data:`SamBase`
  optimiser), bfloat16 autocast.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch

BNPolicy = Literal["recompute", "batch", "interpolate"]
BNRecord = Literal["recompute", "batch", "interpolate", "none"]
BNMode = Literal["eval", "batch"]
Dtype = Literal["float32", "float64", "bfloat16"]
CurvatureDtype = Literal["float32", "float64"]
DeviceName = Literal["auto", "cpu", "cuda"]
DataOnDevice = Literal["auto", "yes", "no"]
Float32Math = Literal["fp32", "tf32", "default"]
Direction = Literal["segment", "random"]
Norm = Literal["filter", "layer", "none"]
Ignore = Literal["bn-and-bias", "none"]
EigenMethod = Literal["lanczos", "arpack"]
ScalingRule = Literal["linear", "sqrt", "none"]
ScheduleKind = Literal["constant", "step", "cosine"]
Optimizer = Literal["adam", "sgd", "sam", "asam"]
SamBase = Literal["sgd", "adam"]  # the optimiser SAM and ASAM step with after their perturbation
Amp = Literal["none", "bf16"]
AlignMethod = Literal["weights", "activations"]
CurveKind = Literal["bezier", "polychain"]
TraceMethod = Literal["hutchinson", "hutchpp"]
WorstNorm = Literal["linf", "l2"]
L2Step = Literal["invariant", "authors"]
PacBayesConvention = Literal["paper", "authors"]  # N(0, σ²) as defined, or Dziugaite et al.'s code's N(0, (σ²)²)
Curvature = Literal["hessian", "ggn"]
SubsetMode = Literal["stratified", "first"]
Loss = Literal["cross_entropy", "mse"]
RunState = Literal["running", "complete", "interrupted", "diverged", "failed"]  # a run directory's status.json
Sink = Literal["tensorboard", "wandb", "mlflow"]  # tracking sinks a training run mirrors its metrics to
Executor = Literal["local", "slurm"]  # who starts a zoo's processes
FullBatch = Literal["full"]  # --batch-size full: full-batch gradient descent

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                        "bfloat16": torch.bfloat16}


def choices(literal: Any) -> tuple[str, ...]:
    """The values a ``Literal`` admits, in their declared order."""
    return tuple(typing.get_args(literal))


def check_choice(what: str, value: object, literal: Any) -> None:
    """Raise ``ValueError`` naming ``what``, the bad value and the valid values, unless ``value`` is one of them."""
    valid = choices(literal)
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(valid)}")
