"""The toolkit's vocabularies: one ``Literal`` per kind of choice, shared by every request, function and flag.

* :data:`BNPolicy` — what BatchNorm does at a point of a path or grid that is not a trained checkpoint:
  ``recompute`` (reset and re-estimate the running statistics on training data), ``batch`` (normalise with each
  evaluation batch's statistics), ``interpolate`` (move the running statistics with the weights).
* :data:`BNMode` — how BatchNorm normalises inside one function evaluation: ``eval`` (running statistics) or
  ``batch`` (each fixed evaluation batch's own statistics, running buffers untouched).
* :data:`Dtype` — the floating-point type of evaluation: ``float32``, ``float64``, or ``bfloat16`` (autocast:
  parameters, BatchNorm statistics and sums stay float32/float64). :data:`CurvatureDtype` is the subset in which
  derivatives are taken.
* :data:`DeviceName` — ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` (under torchrun, GPU
  ``LOCAL_RANK``).
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch

BNPolicy = Literal["recompute", "batch", "interpolate"]
BNMode = Literal["eval", "batch"]
Dtype = Literal["float32", "float64", "bfloat16"]
CurvatureDtype = Literal["float32", "float64"]
DeviceName = Literal["auto", "cpu", "cuda"]

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
