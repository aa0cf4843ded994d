"""Hypothesis fuzz of ``lowrank_linear`` on forced Triton over shapes and layouts."""

from __future__ import annotations

import pytest
import torch

from plrd_kernels import lowrank_linear
from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _check(x, down, up, bias):
    leaves = [t.detach().requires_grad_() for t in (x, down, up)]
    b = None if bias is None else bias.detach().requires_grad_()
    y = lowrank_linear(*leaves, b)
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves + ([] if b is None else [b]), grad_y)
    y_ref, grads_ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    assert relative_error(y, y_ref) < 1e-5, "forward"
    for name, g, g_ref in zip(("x", "down", "up", "bias"), grads, grads_ref, strict=False):
        assert relative_error(g, g_ref) < 1e-5, name


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    k=st.integers(1, 50),
    r=st.integers(1, 40),
    n=st.integers(1, 50),
    with_bias=st.booleans(),
    transpose_x=st.booleans(),
)
def test_fuzz_shapes(triton_backend, lead, k, r, n, with_bias, transpose_x):
    device = triton_backend
    if transpose_x and len(lead) == 2:
        x = torch.randn(lead[1], lead[0], k, device=device).transpose(0, 1)
    elif transpose_x:
        x = torch.randn(k, *lead, device=device).t()
    else:
        x = torch.randn(*lead, k, device=device)
    down = torch.randn(r, k, device=device) / k**0.5
    up = torch.randn(n, r, device=device) / r**0.5
    bias = torch.randn(n, device=device) if with_bias else None
    _check(x, down, up, bias)
