"""The first call of a new shape under the real ``triton.autotune`` (two or more configs).

The autotuner runs every config several times before the launch whose result the caller
gets; a kernel that reads what it writes (an accumulation buffer) would add into it once
per benchmark run. ``tuning.fresh_autotuning`` empties every cache, so each call below
is a first call; on the CPU it tunes the interpreter configs with a CPU clock.
"""

from __future__ import annotations

import pytest
import torch

from plrd_kernels import lowrank_linear
from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _tuners():
    from plrd_kernels import triton_ops, tuning  # noqa: F401 (every kernel module, every tuner)

    return [tuner for tuner, _, _ in tuning._TUNERS]


@pytest.mark.parametrize(
    "m, k, n, r, dtype",
    [
        # 3 rank chunks (fp32 holds 256); K == N
        pytest.param(20, 24, 24, 600, torch.float32, id="fp32-chunked"),
        pytest.param(20, 24, 16, 1100, torch.float16, id="fp16-chunked"),  # 16-bit holds 512
        pytest.param(24, 32, 48, 100, torch.float32, id="fp32-one-launch"),
        pytest.param(24, 32, 48, 100, torch.float16, id="fp16-one-launch"),
        pytest.param(8, 300, 40, 30, torch.float16, id="fp16-decode"),  # shrink, then expand
    ],
)
def test_first_call_under_autotuning(triton_backend, m, k, n, r, dtype):
    from plrd_kernels import triton_ops, tuning  # noqa: F401 (every tuner registered)

    device = triton_backend
    x = torch.randn(m, k, device=device).to(dtype)
    down = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    up = (torch.randn(n, r, device=device) / r**0.5).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    grad_y = torch.randn(m, n, device=device).to(dtype)
    leaves = [t.detach().requires_grad_() for t in (x, down, up, bias)]
    with tuning.fresh_autotuning():
        y = lowrank_linear(*leaves)
        grads = torch.autograd.grad(y, leaves, grad_y)
        tuned = sum(len(tuner.cache) for tuner in _tuners())
    if dtype == torch.float32 and not tuning.INTERPRET:
        assert tuned == 0  # on a GPU fp32 runs each list's fallback config, untuned
    else:
        assert tuned >= 3  # the forward and dX launches and the reductions were tuned
    y_ref, grads_ref = lowrank_linear_grads_reference(x, down, up, bias, grad_y)
    assert relative_error(y, y_ref) < TOL[dtype], "forward"
    for name, g, g_ref in zip(("x", "down", "up", "bias"), grads, grads_ref, strict=True):
        assert relative_error(g, g_ref) < TOL[dtype], name


def test_forward_and_dx_chains_tune_apart(device):
    """K == N: the forward chain (A = downᵀ, B = upᵀ: column-major) and the dX chain
    (A = up, B = down: row-major) have different operand layouts and get separate configs."""
    from plrd_kernels import chain, tuning
    from plrd_kernels.layout import padded_rank

    m, k, r = 40, 32, 8
    half = {"device": device, "dtype": torch.float16}  # fp32 runs one config, untuned, on a GPU
    x, grad_y = torch.randn(m, k, **half), torch.randn(m, k, **half)
    down, up = torch.randn(r, k, **half), torch.randn(k, r, **half)
    tuner = chain.TUNED[chain.tier_for_rank(padded_rank(r))].for_dtype(x.dtype)
    with tuning.fresh_autotuning():
        chain.chain(x, down.t(), up.t(), store_t=True)
        assert len(tuner.cache) == 1
        chain.chain(grad_y, up, down, store_t=True)
        assert len(tuner.cache) == 2


def test_autotune_key_buckets_rows(device):
    """Row counts in one power-of-two bucket share a tuned config; another bucket tunes."""
    from plrd_kernels import chain, tuning
    from plrd_kernels.layout import padded_rank

    k, r, n = 24, 8, 20
    half = {"device": device, "dtype": torch.float16}  # fp32 runs one config, untuned, on a GPU
    a, b = torch.randn(k, r, **half), torch.randn(r, n, **half)
    tuner = chain.TUNED[chain.tier_for_rank(padded_rank(r))].for_dtype(a.dtype)
    with tuning.fresh_autotuning():
        for m in (33, 40, 64):  # bucket 64
            chain.chain(torch.randn(m, k, **half), a, b)
        assert len(tuner.cache) == 1
        chain.chain(torch.randn(65, k, **half), a, b)  # bucket 128
        assert len(tuner.cache) == 2
        chosen = [line for line in tuning.tuned_choices() if line.startswith("_chain_kernel ")]
        assert len(chosen) == 2  # what a benchmark reports as the configs picked
