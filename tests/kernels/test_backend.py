"""Backend choice (``PLRD_BACKEND``), input validation, and the torch path."""

from __future__ import annotations

import pytest
import torch

from plrd_kernels import lowrank_linear
from plrd_kernels.backend import (
    AUTO_MAX_IN_FEATURES,
    AUTO_MAX_PADDED_RANK,
    AUTO_MAX_ROWS,
    choose_backend,
    requested_backend,
    triton_expected_to_win,
)
from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error


def _tensors(m=4, k=12, r=3, n=7, device="cpu", dtype=torch.float32):
    return (
        torch.randn(m, k, device=device, dtype=dtype),
        torch.randn(r, k, device=device, dtype=dtype),
        torch.randn(n, r, device=device, dtype=dtype),
    )


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("PLRD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PLRD_BACKEND='cuda'"):
        requested_backend()
    with pytest.raises(ValueError, match="auto, triton, torch"):
        lowrank_linear(*_tensors())


@pytest.mark.parametrize(
    "value, expected", [("", "auto"), (" Torch ", "torch"), ("TRITON", "triton")]
)
def test_backend_names_are_normalised(monkeypatch, value, expected):
    monkeypatch.setenv("PLRD_BACKEND", value)
    assert requested_backend() == expected


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("PLRD_BACKEND", raising=False)
    assert choose_backend(*_tensors(m=4096, k=512, r=16, n=512)) == "torch"


def test_forced_triton_on_cpu_without_interpreter_fails_clearly(monkeypatch):
    monkeypatch.setenv("PLRD_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lowrank_linear(*_tensors())


def test_auto_rule():
    """Triton where the H200 sweep measured it faster (one-row decode, K ≤ 4096), torch at
    the shapes where it lost (16 and 8,192 rows, K = 11,008, fp32)."""
    bf16 = torch.bfloat16
    assert triton_expected_to_win(AUTO_MAX_ROWS, AUTO_MAX_IN_FEATURES, 4096, 64, bf16)
    assert triton_expected_to_win(1, 576, 1536, AUTO_MAX_PADDED_RANK, torch.float16)
    assert not triton_expected_to_win(1, 4096, 4096, AUTO_MAX_PADDED_RANK + 1, bf16)
    assert not triton_expected_to_win(16, 4096, 4096, 64, bf16)
    assert not triton_expected_to_win(8192, 4096, 4096, 64, bf16)
    assert not triton_expected_to_win(1, 11008, 4096, 64, bf16)
    assert not triton_expected_to_win(1, 4096, 4096, 64, torch.float32)


@pytest.mark.parametrize(
    "args, message",
    [
        (((4, 12), (3, 12), (7, 4), None), "rank mismatch"),
        (((4, 11), (3, 12), (7, 3), None), "features in its last dim"),
        (((4, 12), (3, 12, 1), (7, 3), None), "must be 2-D"),
        (((4, 12), (3, 12), (7, 3), (6,)), r"bias must have shape \(7,\)"),
        (((4, 12), (3, 12), (7, 3), (1,)), r"bias must have shape \(7,\)"),
    ],
)
def test_shape_errors(args, message):
    x, down, up, bias = (None if s is None else torch.randn(*s) for s in args)
    with pytest.raises(ValueError, match=message):
        lowrank_linear(x, down, up, bias)


def test_mixed_dtypes_rejected_on_triton(triton_backend):
    x, down, up = _tensors(device=triton_backend)
    with pytest.raises(ValueError, match="x torch.float16, down torch.float32"):
        lowrank_linear(x.half(), down, up)


def test_autocast_casts_for_the_kernels(triton_backend):
    """Under autocast the Triton path computes in the autocast dtype, like torch's matmul."""
    device = triton_backend
    x, down, up = _tensors(device=device)
    with torch.autocast(device_type=device, dtype=torch.float16):
        y = lowrank_linear(x, down, up)
    assert y.dtype == torch.float16
    ref, _ = lowrank_linear_grads_reference(
        x.half(), down.half(), up.half(), None, torch.zeros(4, 7, device=device)
    )
    assert relative_error(y, ref) < 1e-3


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_torch_path_forward_and_grads(monkeypatch, dtype, tol):
    monkeypatch.setenv("PLRD_BACKEND", "torch")
    x = torch.randn(2, 5, 12, dtype=dtype).requires_grad_()
    down, up = (
        (torch.randn(3, 12, dtype=dtype) / 4).requires_grad_(),
        torch.randn(7, 3, dtype=dtype),
    )
    bias = torch.randn(7, dtype=dtype).requires_grad_()
    up.requires_grad_()
    y = lowrank_linear(x, down, up, bias)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, down, up, bias), grad_y)
    y_ref, grads_ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    assert y.shape == (2, 5, 7)
    assert relative_error(y, y_ref) < tol
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert relative_error(g, g_ref) < tol
