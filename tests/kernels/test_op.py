"""``lowrank_linear`` on forced Triton: forward and every gradient against float64."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plrd_kernels import lowrank_linear
from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _factors(k, r, n, device, dtype, bias=True):
    down = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    up = (torch.randn(n, r, device=device) / r**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return down, up, b


def _check_forward_and_grads(x, down, up, bias, grad_y=None, tol=1e-5):
    """Run the op with grads on every input, compare y and all grads with float64."""
    leaves = [t.detach().requires_grad_() for t in (x, down, up)]
    b = None if bias is None else bias.detach().requires_grad_()
    y = lowrank_linear(*leaves, b)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    inputs = leaves + ([] if b is None else [b])
    grads = torch.autograd.grad(y, inputs, grad_y)
    y_ref, grads_ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert relative_error(y, y_ref) < tol, "forward"
    for name, g, g_ref in zip(("x", "down", "up", "bias"), grads, grads_ref, strict=False):
        assert g.shape == g_ref.shape, name
        assert relative_error(g, g_ref) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    "lead, k, r, n",
    [
        ((1,), 20, 1, 40),  # M = 1, R = 1
        ((5,), 37, 17, 70),  # nothing a multiple of 16
        ((2, 9), 48, 17, 24),  # 3-D input
        ((70,), 64, 64, 48),  # several row blocks
        ((300,), 40, 8, 12),  # long M: split-M reductions in the backward
    ],
)
def test_forward_and_grads(triton_backend, dtype, with_bias, lead, k, r, n):
    device = triton_backend
    x = torch.randn(*lead, k, device=device).to(dtype)
    down, up, bias = _factors(k, r, n, device, dtype, with_bias)
    _check_forward_and_grads(x, down, up, bias, tol=TOL[dtype])


@pytest.mark.parametrize(
    "make_x",
    [
        lambda d: torch.randn(7, 3, 33, device=d).transpose(0, 1),  # transposed 3-D view
        lambda d: torch.randn(11, 66, device=d)[:, 1::2],  # non-contiguous features
        lambda d: torch.randn(33, 10, device=d).t(),  # transposed 2-D
    ],
)
def test_strided_inputs(triton_backend, make_x):
    device = triton_backend
    x = make_x(device)
    down, up, bias = _factors(33, 9, 21, device, torch.float32)
    _check_forward_and_grads(x, down, up, bias)


def test_transposed_factors(triton_backend):
    """down and up given as transposed views (column-major storage)."""
    device = triton_backend
    x = torch.randn(13, 29, device=device)
    down = torch.randn(29, 6, device=device).t()
    up = torch.randn(6, 31, device=device).t()
    _check_forward_and_grads(x, down, up, torch.randn(31, device=device))


def test_stride_zero_grad(triton_backend):
    """``y.sum().backward()`` hands the backward an expanded (stride-0) gradient."""
    device = triton_backend
    x = torch.randn(3, 5, 22, device=device)
    down, up, bias = _factors(22, 7, 18, device, torch.float32)
    grad_y = torch.ones(1, 1, 1, device=device).expand(3, 5, 18)
    _check_forward_and_grads(x, down, up, bias, grad_y=grad_y)
    leaves = [t.detach().requires_grad_() for t in (x, down, up, bias)]
    lowrank_linear(*leaves).sum().backward()
    _, ref = lowrank_linear_grads_reference(x, down, up, bias, torch.ones(3, 5, 18, device=device))
    for leaf, g_ref in zip(leaves, ref, strict=True):
        assert relative_error(leaf.grad, g_ref) < 1e-5


@pytest.mark.parametrize("needs", ["x", "down", "up", "bias", "up+bias", "x+down"])
def test_grad_subsets(triton_backend, needs):
    """Only the requested gradients are computed, and they are right."""
    device = triton_backend
    x = torch.randn(4, 6, 19, device=device)
    down, up, bias = _factors(19, 5, 14, device, torch.float32)
    tensors = {"x": x, "down": down, "up": up, "bias": bias}
    wanted = needs.split("+")
    for name in wanted:
        tensors[name] = tensors[name].detach().requires_grad_()
    y = lowrank_linear(tensors["x"], tensors["down"], tensors["up"], tensors["bias"])
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, [tensors[n] for n in wanted], grad_y)
    _, ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    ref_by_name = dict(zip(("x", "down", "up", "bias"), ref, strict=True))
    for name, g in zip(wanted, grads, strict=True):
        assert relative_error(g, ref_by_name[name]) < 1e-5, name


def test_no_grad_forward(triton_backend):
    device = triton_backend
    x = torch.randn(8, 16, device=device)
    down, up, bias = _factors(16, 4, 10, device, torch.float32)
    with torch.no_grad():
        y = lowrank_linear(x, down.requires_grad_(), up.requires_grad_(), bias)
    assert not y.requires_grad
    ref, _ = lowrank_linear_grads_reference(x, down, up, bias, torch.zeros(8, 10, device=device))
    assert relative_error(y, ref) < 1e-5


_MATMUL_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot", "vdot",
    "linear", "einsum", "tensordot", "outer", "addr", "_scaled_mm", "convolution",
}  # fmt: skip


class _CountMatmuls(TorchDispatchMode):
    """Counts aten matrix-product calls (``aten.matmul`` reaches here as ``mm``/``bmm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _MATMUL_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmul_counts(device):
    x = torch.randn(2, 6, 24, device=device, requires_grad=True)
    down, up, bias = (t.requires_grad_() for t in _factors(24, 5, 16, device, torch.float32))
    with _CountMatmuls() as fwd:
        y = lowrank_linear(x, down, up, bias)
    with _CountMatmuls() as bwd:
        y.backward(torch.randn_like(y))
    assert all(t.grad is not None for t in (x, down, up, bias))
    return fwd.count, bwd.count


def test_no_torch_matmul_in_forced_triton(triton_backend, monkeypatch):
    """Forced Triton: zero torch matrix products, forward and backward; the counter itself
    sees the torch path's products (so a zero means something)."""
    assert _matmul_counts(triton_backend) == (0, 0)
    monkeypatch.setenv("PLRD_BACKEND", "torch")
    fwd, bwd = _matmul_counts(triton_backend)
    assert fwd >= 2 and bwd >= 3


def test_dynamo_traces_without_graph_breaks(triton_backend):
    """``torch.compile(fullgraph=True)`` captures the dispatch and the custom op in one graph
    (backend "eager": inductor cannot compile Triton under the CPU interpreter)."""
    device = triton_backend
    torch._dynamo.reset()
    compiled = torch.compile(lowrank_linear, backend="eager", fullgraph=True)
    x = torch.randn(3, 4, 20, device=device, requires_grad=True)
    down, up, bias = _factors(20, 6, 12, device, torch.float32)
    y = compiled(x, down, up, bias)
    y.sum().backward()
    ref, ref_grads = lowrank_linear_grads_reference(x, down, up, bias, torch.ones_like(y))
    assert relative_error(y, ref) < 1e-5
    assert relative_error(x.grad, ref_grads[0]) < 1e-5


def test_opcheck_schema_autograd_fake(triton_backend):
    """torch.library.opcheck's schema, autograd-registration and fake-tensor checks (the AOT
    dispatch check needs a GPU: tests/kernels/test_gpu.py)."""
    device = triton_backend
    from plrd_kernels import triton_ops  # noqa: F401  (registers the ops)

    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    down, up, bias = (t.requires_grad_() for t in _factors(24, 5, 16, device, torch.float32))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.plrd.chain.default, (x, down.t(), up.t(), bias, True, True), test_utils=utils
    )
    torch.library.opcheck(
        torch.ops.plrd.reduce_rows.default, (x.detach(), torch.randn(2, 5, 7, device=device), True),
        test_utils=utils,
    )  # fmt: skip


def test_dynamic_rows_compile_once(triton_backend):
    """``torch.compile(dynamic=True)`` keeps M symbolic on the Triton path: one graph for
    every M above the decode path's bound, and one more for M ≤ that bound (a real branch:
    other kernels), as the torch path would give one graph in all."""
    from torch._dynamo.utils import counters

    from plrd_kernels.decode import MAX_ROWS

    device = triton_backend
    down, up, bias = _factors(20, 6, 12, device, torch.float32)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lowrank_linear, backend="eager", dynamic=True, fullgraph=True)

    def run(m):
        x = torch.randn(m, 20, device=device)
        ref, _ = lowrank_linear_grads_reference(x, down, up, bias, torch.zeros(m, 12))
        assert relative_error(compiled(x, down, up, bias), ref) < 1e-5, m

    for m in (MAX_ROWS + 17, 70, 150, 600):
        run(m)
    assert counters["stats"]["unique_graphs"] == 1
    for m in (2, MAX_ROWS):
        run(m)
    assert counters["stats"]["unique_graphs"] == 2
