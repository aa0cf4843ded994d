"""Choice of backend for ``lowrank_linear``: env ``PLRD_BACKEND`` = auto | triton | torch.

- ``torch``: two torch matmuls (``plrd_kernels.reference``), autograd for the backward.
- ``triton``: the fused kernels for the forward and every product of the backward. CUDA
  tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels were first
  used (the interpreter: slow, for tests).
- ``auto`` (default): Triton for CUDA tensors where the fused kernel was measured to win
  (``triton_expected_to_win``: fp16/bf16, one row, ≤ 4096 input features, padded rank
  ≤ 256: a decode step), torch otherwise (always torch on CPU). Under autocast the dtype
  checked is the autocast dtype.

The ``auto`` rule and the H200 sweep it follows live in benchmarks/NOTES.md §4; the
constants are here.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from plrd_kernels.layout import padded_rank

BACKENDS = ("auto", "triton", "torch")

AUTO_MAX_ROWS = 1
"""auto: most rows M sent to Triton. One row (a decode step) is where the split-K decode
kernels beat the two cuBLAS calls on an H200 (1.04–1.45× at K = 4096); at 16 rows they lose
(0.13–0.98×), and at 8,192 rows the fused chain loses to the two GEMMs (0.47–0.77×)."""

AUTO_MAX_IN_FEATURES = 4096
"""auto: most input features K sent to Triton. At K = 11,008 the one-row decode path loses
(0.62–0.92×): its split-K partials outgrow what the two launches save."""

AUTO_MAX_PADDED_RANK = 256
"""auto: largest padded rank sent to Triton (the largest measured; 1.04–1.06× at 256)."""


def requested_backend() -> str:
    """The backend named by ``PLRD_BACKEND`` (default ``auto``), validated."""
    name = os.environ.get("PLRD_BACKEND")
    if name is None:
        return "auto"
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"PLRD_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}"
        )
    return name


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET=1`` is set (the Triton CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton can be imported (it ships for Linux only). Looked up once, at import: Dynamo
    (torch 2.11) refuses to trace ``importlib.util.find_spec``, and ``torch.compile`` traces
    this dispatch with ``fullgraph=True``."""
    return _TRITON_INSTALLED


AUTO_DTYPES = (torch.float16, torch.bfloat16)
"""auto: dtypes sent to Triton. IEEE fp32 has no tensor-core path (the kernels' fp32 products
use FMA and spill registers: benchmarks/NOTES.md), so fp32 stays on cuBLAS."""


def triton_expected_to_win(
    rows: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype
) -> bool:
    """The ``auto`` rule for CUDA tensors: the fused kernels only where the H200 sweep
    measured them faster than two torch matmuls (one row, K ≤ 4096, padded rank ≤ 256,
    16-bit; benchmarks/NOTES.md §4). ``out_features`` did not change the outcome
    (N = 4096 and 11,008 alike)."""
    del out_features
    return (
        dtype in AUTO_DTYPES
        and rows <= AUTO_MAX_ROWS
        and in_features <= AUTO_MAX_IN_FEATURES
        and padded_rank(rank) <= AUTO_MAX_PADDED_RANK
    )


def choose_backend(x: Tensor, down: Tensor, up: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for this call, from ``PLRD_BACKEND`` and the tensors.

    Raises ``RuntimeError`` when ``PLRD_BACKEND=triton`` cannot run: no Triton, or CPU
    tensors without ``TRITON_INTERPRET=1``.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(
                "PLRD_BACKEND=triton but Triton is not installed; use PLRD_BACKEND=torch or auto"
            )
        on_cuda = x.is_cuda and down.is_cuda and up.is_cuda
        if not on_cuda and not interpreter_requested():
            raise RuntimeError(
                f"PLRD_BACKEND=triton needs CUDA tensors, got x on {x.device}, down on "
                f"{down.device}, up on {up.device}; for CPU tensors set TRITON_INTERPRET=1 "
                "before the first call (slow; meant for tests) or use PLRD_BACKEND=auto"
            )
        return "triton"
    if not (x.is_cuda and triton_available()):
        return "torch"
    rows = math.prod(x.shape[:-1])
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    wins = triton_expected_to_win(rows, down.shape[1], up.shape[0], down.shape[0], dtype)
    return "triton" if wins else "torch"
