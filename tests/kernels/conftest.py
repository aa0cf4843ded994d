"""Kernel tests: on a machine without CUDA the Triton kernels run in the CPU interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so it is set here, at
conftest import, before any test imports the kernel modules (``plrd_kernels`` itself imports
them lazily). If they were imported earlier, the session stops with an error at collection
(and the ``device`` fixture fails): the tests never skip for it. Outputs and workspaces are
NaN-filled before every launch, so an element a kernel fails to write makes the comparison
fail.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

_COMPILED_TOO_EARLY = (
    "plrd_kernels' Triton modules were imported before tests/kernels/conftest.py could set "
    "TRITON_INTERPRET=1, so their kernels are compiled-GPU kernels and cannot run on this "
    "machine without CUDA. Something imported plrd_kernels.tuning (or chain, grads, decode, "
    "triton_ops) earlier in this session: import them lazily, or run with TRITON_INTERPRET=1."
)


def kernels_loaded_for_the_gpu() -> bool:
    """The kernel modules are loaded, for the GPU, in a session that has no GPU."""
    tuning = sys.modules.get("plrd_kernels.tuning")
    return not HAS_CUDA and tuning is not None and not tuning.INTERPRET


if kernels_loaded_for_the_gpu():  # fail the session at collection, never skip the tests
    raise pytest.UsageError(_COMPILED_TOO_EARLY)

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
        import plrd_kernels.tuning  # noqa: F401  (loads the kernels if not yet loaded)

        if kernels_loaded_for_the_gpu():
            pytest.fail(_COMPILED_TOO_EARLY)
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch, device: str) -> str:
    """``PLRD_BACKEND=triton`` for this test; returns the device."""
    monkeypatch.setenv("PLRD_BACKEND", "triton")
    return device
