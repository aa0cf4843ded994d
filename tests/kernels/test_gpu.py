"""CUDA-only kernel tests: bf16, TF32, every autotune config, large shapes, int64 offsets,
torch.compile (inductor) and the full ``torch.library.opcheck``.

The rest of tests/kernels also runs on CUDA when one is present (the ``device`` fixture).
"""

from __future__ import annotations

import pytest
import torch

from plrd_kernels import lowrank_linear
from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"


def _inputs(lead, k, r, n, dtype, bias=True):
    x = torch.randn(*lead, k, device=CUDA).to(dtype)
    down = (torch.randn(r, k, device=CUDA) / k**0.5).to(dtype)
    up = (torch.randn(n, r, device=CUDA) / r**0.5).to(dtype)
    b = torch.randn(n, device=CUDA).to(dtype) if bias else None
    return x, down, up, b


def _run_with_grads(fn, x, down, up, bias, grad_y):
    leaves = [t.detach().requires_grad_() for t in (x, down, up)]
    b = None if bias is None else bias.detach().requires_grad_()
    y = fn(*leaves, b)
    inputs = leaves + ([] if b is None else [b])
    return y, torch.autograd.grad(y, inputs, grad_y)


def _assert_close_to_float64(x, down, up, bias, tol, fn=lowrank_linear):
    grad_y = torch.randn(*x.shape[:-1], up.shape[0], device=CUDA).to(x.dtype)
    y, grads = _run_with_grads(fn, x, down, up, bias, grad_y)
    y_ref, grads_ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    assert relative_error(y, y_ref) < tol, "forward"
    for name, g, g_ref in zip(("x", "down", "up", "bias"), grads, grads_ref, strict=False):
        assert relative_error(g, g_ref) < tol, name


@pytest.mark.parametrize(
    "lead, k, r, n",
    [((1,), 20, 1, 40), ((5,), 37, 17, 70), ((3, 33), 96, 64, 80), ((257,), 128, 200, 72)],
)
def test_bf16(triton_backend, lead, k, r, n):
    _assert_close_to_float64(*_inputs(lead, k, r, n, torch.bfloat16), tol=1e-2)


@pytest.mark.parametrize("rank", [32, 400])
@pytest.mark.parametrize("allow_tf32, tol", [(False, 1e-5), (True, 5e-3)])
def test_fp32_follows_allow_tf32(triton_backend, monkeypatch, allow_tf32, tol, rank):
    """IEEE fp32 products unless TF32 is allowed (rank 400: two chunks in fp32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    _assert_close_to_float64(*_inputs((300,), 256, rank, 192, torch.float32), tol=tol)


@pytest.mark.parametrize("rank", [48, 200, 400])
def test_every_chain_config(triton_backend, monkeypatch, rank):
    """Each autotune config of the rank's tier gives the right forward and dX (so the tuner
    can never pick a wrong one). A config that does not fit in shared memory is one the
    tuner skips; the tier's last config must always fit."""
    from triton.runtime.errors import OutOfResources

    from plrd_kernels import chain
    from plrd_kernels.layout import padded_rank

    bound = chain.tier_for_rank(padded_rank(rank))
    tuner = chain.TUNED[bound].for_dtype(torch.bfloat16)
    x, down, up, bias = _inputs((333,), 136, rank, 152, torch.bfloat16)
    too_big = []
    for cfg in chain.TIERS[bound]:
        monkeypatch.setattr(tuner, "configs", [cfg])
        try:
            _assert_close_to_float64(x, down, up, bias, tol=1e-2)
        except OutOfResources:
            too_big.append(cfg)
    assert chain.TIERS[bound][-1] not in too_big


def test_every_reduction_config(triton_backend, monkeypatch):
    from plrd_kernels import grads

    tuner = grads._reduce_rows.for_dtype(torch.bfloat16)
    lhs = torch.randn(3000, 150, device=CUDA, dtype=torch.bfloat16)
    rhs = torch.randn(3000, 70, device=CUDA, dtype=torch.bfloat16)
    c_ref = lhs.double().t() @ rhs.double()
    for cfg in grads._CONFIGS:
        monkeypatch.setattr(tuner, "configs", [cfg])
        for splits in (1, 4):
            c, s = grads.reduce_rows(lhs, rhs, with_sum=True, splits=splits)
            assert relative_error(c, c_ref) < 1e-2
            assert relative_error(s, lhs.double().sum(0)) < 1e-2


@pytest.mark.parametrize("rank", [64, 256])
def test_training_shape(triton_backend, rank):
    """The target shape M=8192, K=N=4096 in bf16, forward and all gradients."""
    _assert_close_to_float64(*_inputs((8192,), 4096, rank, 4096, torch.bfloat16), tol=1e-2)


def test_int64_offsets(triton_backend):
    """x with more than 2³¹ elements: rows past the int32 range are right, forward and dX."""
    k, r, n = 4096, 16, 32
    m = (1 << 31) // k + 64
    x = torch.randn(m, k, device=CUDA, dtype=torch.bfloat16)
    down = (torch.randn(r, k, device=CUDA) / k**0.5).to(torch.bfloat16)
    up = (torch.randn(n, r, device=CUDA) / r**0.5).to(torch.bfloat16)
    xg = x.requires_grad_()
    y = lowrank_linear(xg, down, up)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, (xg,), grad_y)
    tail = slice(m - 200, m)
    y_ref = (x[tail].double() @ down.double().t()) @ up.double().t()
    grad_x_ref = (grad_y[tail].double() @ up.double()) @ down.double()
    assert relative_error(y[tail], y_ref) < 1e-2
    assert relative_error(grad_x[tail], grad_x_ref) < 1e-2


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_torch_compile_inductor(triton_backend, monkeypatch, backend):
    """torch.compile (inductor, fullgraph: no graph breaks) over the triton_op, fwd + bwd;
    with ``auto`` on a shape (1200 rows, rank 24, bf16) that it sends to Triton."""
    monkeypatch.setenv("PLRD_BACKEND", backend)
    torch._dynamo.reset()
    compiled = torch.compile(lowrank_linear, fullgraph=True)
    _assert_close_to_float64(*_inputs((4, 300), 96, 24, 136, torch.bfloat16), 1e-2, compiled)


def test_opcheck_full(triton_backend):
    from plrd_kernels import triton_ops  # noqa: F401  (registers the ops)

    x, down, up, bias = _inputs((2, 40), 64, 16, 48, torch.float32)
    args = (x.requires_grad_(), down.t().requires_grad_(), up.t().requires_grad_(), bias)
    torch.library.opcheck(torch.ops.plrd.chain.default, (*args, True, True))
    torch.library.opcheck(
        torch.ops.plrd.reduce_rows.default, (x.detach(), torch.randn(2, 40, 9, device=CUDA), True)
    )


def test_auto_dispatch_on_cuda(monkeypatch):
    """``auto`` on CUDA tensors follows the measured rule (benchmarks/NOTES.md §4): one bf16
    row goes to the fused decode kernels, a 4096-row batch and fp32 stay on cuBLAS."""
    from plrd_kernels.backend import choose_backend

    monkeypatch.delenv("PLRD_BACKEND", raising=False)
    x, down, up, _ = _inputs((4096,), 256, 64, 256, torch.bfloat16, bias=False)
    assert choose_backend(x[:1], down, up) == "triton"
    assert choose_backend(x, down, up) == "torch"
    assert choose_backend(x[:1].float(), down.float(), up.float()) == "torch"


def test_dynamic_rows_inductor(triton_backend):
    """Inductor with ``dynamic=True``: one graph for several M (all above the decode and
    split-M bounds), forward and backward right for each."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lowrank_linear, dynamic=True, fullgraph=True)
    for m in (1200, 2000, 3001):
        _assert_close_to_float64(*_inputs((m,), 96, 24, 136, torch.bfloat16), 1e-2, compiled)
    assert counters["stats"]["unique_graphs"] == 1
