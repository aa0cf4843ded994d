"""Kernel tests: on a machine without CUDA the Triton kernels run in the CPU interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so it is set here, at
conftest import, before any test imports the kernel modules (``plrd_kernels`` itself imports
them lazily). Outputs and workspaces are NaN-filled before every launch, so an element a
kernel fails to write makes the comparison fail.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from plrd_kernels import layout

    monkeypatch.setattr(layout, "OUTPUT_FILL", math.nan)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where the kernels run: CUDA when present, else CPU under the interpreter."""
    if not HAS_CUDA:
        from plrd_kernels import tuning

        if not tuning.INTERPRET:
            pytest.skip("kernels were loaded before TRITON_INTERPRET=1 could be set")
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch, device: str) -> str:
    """``PLRD_BACKEND=triton`` for this test; returns the device."""
    monkeypatch.setenv("PLRD_BACKEND", "triton")
    return device
