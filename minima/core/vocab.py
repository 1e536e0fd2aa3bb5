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

#: What BatchNorm does at a point of a path or grid that is not a trained checkpoint (see the module docstring).
BNPolicy = Literal["recompute", "batch", "interpolate"]
#: The BatchNorm policy a grid file records: a :data:`BNPolicy`, or ``none`` for a model without BatchNorm.
BNRecord = Literal["recompute", "batch", "interpolate", "none"]
#: How BatchNorm normalises inside one function evaluation: running statistics or the batch's own.
BNMode = Literal["eval", "batch"]
#: The floating-point type of evaluation (``bfloat16``: autocast, sums in float32/float64).
Dtype = Literal["float32", "float64", "bfloat16"]
#: The floating-point types in which derivatives are taken.
CurvatureDtype = Literal["float32", "float64"]
#: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` (under torchrun, GPU ``LOCAL_RANK``).
DeviceName = Literal["auto", "cpu", "cuda"]
#: Data placement: on the device when it fits (``auto``), always, or pinned host memory (``no``).
DataOnDevice = Literal["auto", "yes", "no"]
#: float32 matmuls and convolutions on CUDA: ``fp32`` (TF32 off), ``tf32``, or torch's ``default``.
Float32Math = Literal["fp32", "tf32", "default"]
#: The α line of ``minima.interpolate``: the ``segment`` A→B or a ``random`` direction.
Direction = Literal["segment", "random"]
#: Normalisation of a random direction: per filter, per layer, or none.
Norm = Literal["filter", "layer", "none"]
#: What a random direction does on 1-D parameters: zero on BatchNorm and biases, or no exception.
Ignore = Literal["bn-and-bias", "none"]
#: Eigenvalue solver: ``lanczos`` (torch, full reorthogonalisation) or ``arpack`` (scipy ``eigsh``).
EigenMethod = Literal["lanczos", "arpack"]
#: How the learning rate scales with the global batch size.
ScalingRule = Literal["linear", "sqrt", "none"]
#: The learning-rate schedule after warmup.
ScheduleKind = Literal["constant", "step", "cosine"]
#: The training optimiser (``sam``/``asam``: sharpness-aware steps around a :data:`SamBase` optimiser).
Optimizer = Literal["adam", "sgd", "sam", "asam"]
#: The optimiser SAM and ASAM step with after their perturbation.
SamBase = Literal["sgd", "adam"]
#: Mixed precision of training: none, or bfloat16 autocast.
Amp = Literal["none", "bf16"]
#: How units are matched between two networks: by their weights or by their activations.
AlignMethod = Literal["weights", "activations"]
#: The shape of a trained path: a Bézier curve or a polygonal chain.
CurveKind = Literal["bezier", "polychain"]
#: Which end of the spectrum an eigenvalue metric finds: the algebraically largest, the smallest (negative ones
#: included: saddles, non-convexity), or both.
EigenWhich = Literal["largest", "smallest", "both"]
#: Diagonal estimator: Hutchinson's z ⊙ Hz, or XDiag (exchangeable, with a sketch of the top of the spectrum).
DiagMethod = Literal["hutchinson", "xdiag"]
#: Trace estimator: Hutchinson or Hutch++.
TraceMethod = Literal["hutchinson", "hutchpp"]
#: The set of worst-case sharpness: an ℓ∞ box or an ℓ2 ellipsoid.
WorstNorm = Literal["linf", "l2"]
#: The ℓ2 ascent step of worst-case sharpness: invariant (scaled coordinates) or the authors'.
L2Step = Literal["invariant", "authors"]
#: The iteration of worst-case sharpness: the authors' code's, or the Auto-PGD paper's.
WorstLoop = Literal["authors", "apgd"]
#: N(0, σ²) as defined, or Dziugaite et al.'s code's N(0, (σ²)²).
PacBayesConvention = Literal["paper", "authors"]
#: The curvature operator: the Hessian, the generalised Gauss–Newton matrix (GGN), the empirical Fisher (``ef``, the
#: data's labels) or the Monte-Carlo Fisher (``fisher``, labels drawn from the model; its expectation is the GGN).
Curvature = Literal["hessian", "ggn", "ef", "fisher"]
#: How a data subset is drawn: stratified by class, or the first images of the split.
SubsetMode = Literal["stratified", "first"]
#: The training and evaluation loss.
Loss = Literal["cross_entropy", "mse"]
#: A run directory's ``status.json`` state.
RunState = Literal["running", "complete", "interrupted", "diverged", "failed"]
#: Tracking sinks a training run mirrors its metrics to.
Sink = Literal["tensorboard", "wandb", "mlflow"]
#: Who starts a zoo's processes: local worker processes or Slurm (submitit).
Executor = Literal["local", "slurm"]
#: ``--batch-size full``: full-batch gradient descent.
FullBatch = Literal["full"]

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                        "bfloat16": torch.bfloat16}


def choices(literal: Any) -> tuple[str, ...]:
    """The values a ``Literal`` admits, in their declared order.

    >>> choices(BNPolicy)
    ('recompute', 'batch', 'interpolate')
    """
    return tuple(typing.get_args(literal))


def check_choice(what: str, value: object, literal: Any) -> None:
    """Raise ``ValueError`` naming ``what``, the bad value and the valid values, unless ``value`` is one of them."""
    valid = choices(literal)
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(valid)}")
