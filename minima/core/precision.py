"""The float32 math policy: whether float32 matrix products and convolutions may use TF32 on CUDA, set for a block
and restored after, and the effective settings recorded in every output.

On NVIDIA GPUs since Ampere, cuDNN convolutions run float32 inputs through TF32 (10-bit mantissa) by default and
matrix products may too (``torch.backends.cuda.matmul.allow_tf32``); a result labelled "float32" can then carry
relative errors near 1e-3 instead of 1e-7. Curvature and sharpness are sensitive to that, so evaluation, sweeps and
curvature run under ``fp32`` (TF32 off) unless ``tf32`` is asked for; training defaults to PyTorch's own settings
(``default``). The flags act on CUDA only — on a CPU the recorded settings say so (``tf32_applies: false``).
bfloat16 is a separate, explicit choice (``--dtype bfloat16`` for evaluation, ``--amp bf16`` for training: autocast
with float32/float64 sums) and is recorded beside these flags.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from typing import Any

import torch

from minima.core.vocab import Float32Math

FLOAT32_MATH: tuple[str, ...] = typing.get_args(Float32Math)


def _flags() -> tuple[bool, bool, str]:
    return (bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32),
            torch.get_float32_matmul_precision())


def _set(flags: tuple[bool, bool, str]) -> None:
    # The precision string first: setting it also moves matmul.allow_tf32, which the next line then fixes.
    torch.set_float32_matmul_precision(flags[2])
    torch.backends.cuda.matmul.allow_tf32 = flags[0]
    torch.backends.cudnn.allow_tf32 = flags[1]


@contextlib.contextmanager
def float32_math(mode: Float32Math) -> Iterator[None]:
    """Run the block with TF32 off (``fp32``: IEEE float32 matmuls and cuDNN convolutions), on (``tf32``), or as
    PyTorch is set (``default``); the process-wide flags are restored afterwards, whatever happens inside."""
    if mode not in FLOAT32_MATH:
        raise ValueError(f"unknown float32 math {mode!r}; choose one of {list(FLOAT32_MATH)}")
    saved = _flags()
    try:
        if mode == "fp32":
            _set((False, False, "highest"))
        elif mode == "tf32":
            _set((True, True, "high"))
        yield
    finally:
        _set(saved)


def effective(device: torch.device | str, mode: str, autocast: str | None = None) -> dict[str, Any]:
    """The float32 math in effect now, as recorded in checkpoints, grid files and sharpness results: the requested
    ``mode``, the two TF32 flags, ``float32_matmul_precision``, whether TF32 can apply at all on ``device`` (CUDA
    with compute capability ≥ 8.0), and the autocast dtype if any (e.g. ``"bfloat16"``)."""
    device = torch.device(device)
    matmul, cudnn, precision = _flags()
    applies = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return {"float32_math": mode, "cuda_matmul_allow_tf32": matmul, "cudnn_allow_tf32": cudnn,
            "float32_matmul_precision": precision, "tf32_applies": bool(applies and (matmul or cudnn)),
            "autocast": autocast, "device": str(device)}
