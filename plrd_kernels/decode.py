"""The chain ``Y = (X·A)·B + bias`` for a few rows (decode): split-K shrink, then expand.

Math, with X [M, K] (M ≤ ``MAX_ROWS``), A [K, R], B [R, N], S slices of K::

    P[s] = X[:, K_s]·A[K_s, :]          [S, M, R]  fp32, one program per slice (shrink)
    T    = Σ_s P[s]                     [M, R]     fp32, summed in the order s = 0, 1, ...
    Y    = T·B + bias                   [M, N]     T rounded to the input dtype first

With one row block the chain kernel can spread only N over the SMs, and each of those
programs walks all of K alone, re-reading the whole of A. Here the K walk (the larger read
at decode: A is K×R) is spread over S programs, and each expand program sums the small
partials (S·M·R fp32) and writes one N tile of Y. Two launches, like the torch chain; no
atomics, so the result is deterministic, and no launch reads what it writes (the autotuner
may rerun either). Used by ``plrd_kernels.chain.chain`` for one rank chunk and M ≤ MAX_ROWS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plrd_kernels.layout import RowLayout, new_buffer, padded_rank
from plrd_kernels.tuning import autotune, config, launch, num_sms, tf32_allowed, unit_stride

MAX_ROWS = 16
"""Most rows sent to the decode path (one 16-row tile: ``tl.dot``'s smallest)."""

MIN_K_PER_SPLIT = 128
"""Fewest K columns per shrink program: enough work to hide a load's latency."""

MAX_K_SPLITS = 32
"""Most shrink programs. The expand kernel sums all S partials serially before its N tile, so
its time grows with S·R: on an H200 K = 11,008 (86 splits) ran 3–6 µs slower than K = 4096
(32 splits). Capped, a longer K walk per shrink program replaces the longer sum
(benchmarks/NOTES.md §9: predicted, not yet measured)."""

# Configs by padded-rank tier, as for the chain (the T tile is 16 × RP fp32 in registers, the
# A and B tiles BLOCK × RP in shared memory); each list ends with the config PLRD_AUTOTUNE=0
# uses. RP = 512 takes 8 warps: 4 spill (benchmarks/NOTES.md §3).
SHRINK_TIERS = {
    128: [config(4, 3, BLOCK_K=128), config(4, 2, BLOCK_K=64), config(4, 1, BLOCK_K=32)],
    512: [config(8, 2, BLOCK_K=64), config(8, 1, BLOCK_K=32)],
}
EXPAND_TIERS = {
    128: [config(4, 2, BLOCK_N=128), config(4, 2, BLOCK_N=64), config(4, 1, BLOCK_N=32)],
    512: [config(8, 2, BLOCK_N=64), config(8, 1, BLOCK_N=32)],
}
_INTERPRETER_SHRINK = [config(4, 1, BLOCK_K=32), config(4, 1, BLOCK_K=16)]
_INTERPRETER_EXPAND = [config(4, 1, BLOCK_N=32), config(4, 1, BLOCK_N=64)]


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, p_ptr,
    M, K, R, M_INNER, K_SPLIT,
    stride_x0, stride_x1, stride_xk,
    stride_ak, stride_ar,
    stride_ps, stride_pm,
    RP: tl.constexpr, ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program s writes ``P[s] = X[:, k0:k1]·A[k0:k1, :]`` with ``k0 = s·K_SPLIT``,
    ``k1 = min(k0 + K_SPLIT, K)``.

    Arguments:
        x_ptr: X [M, K], row m at ``(m // M_INNER)·stride_x0 + (m % M_INNER)·stride_x1``.
        a_ptr: A [K, R] at ``k·stride_ak + r·stride_ar``.
        p_ptr: fp32 partials [S, M, R] at ``s·stride_ps + m·stride_pm + r``.
        BLOCK_M: ≥ M (all rows in one tile); RP: R padded to a power of two ≥ 16.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    x_rows = (rows // M_INNER) * stride_x0 + (rows % M_INNER) * stride_x1
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    r64 = offs_r.to(tl.int64)
    k_start = pid * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < k_end
        k64 = kk.to(tl.int64)
        x = tl.load(
            x_ptr + x_rows[:, None] + k64[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + k64[:, None] * stride_ak + r64[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = tl.dot(x, a, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
    p_offs = pid.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + r64[None, :]
    tl.store(p_ptr + p_offs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    p_ptr, b_ptr, bias_ptr, y_ptr, t_ptr,
    M, N, R, S,
    stride_ps, stride_pm,
    stride_br, stride_bn,
    stride_bias,
    stride_ym, stride_yn,
    stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, RP: tl.constexpr,
    ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program j: ``T = Σ_s P[s]`` rounded to Y's dtype, then ``Y[:, tile j] = T·B + bias``;
    program 0 also writes T if STORE_T.

    Arguments:
        p_ptr: fp32 partials [S, M, R] (see ``_shrink_kernel``).
        b_ptr: B [R, N] at ``r·stride_br + n·stride_bn``; bias_ptr: [N] (if HAS_BIAS).
        y_ptr: Y [M, N] at ``m·stride_ym + n·stride_yn`` (the input dtype).
        t_ptr: T [M, R] at ``m·stride_tm + r·stride_tr``.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    r64 = offs_r.to(tl.int64)
    mask_t = mask_m[:, None] & mask_r[None, :]
    p_ptrs = p_ptr + rows[:, None] * stride_pm + r64[None, :]
    acc_t = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for s in range(0, S):
        acc_t += tl.load(p_ptrs + s * stride_ps, mask=mask_t, other=0.0)
    t = acc_t.to(y_ptr.dtype.element_ty)
    if STORE_T:
        if pid == 0:
            tl.store(t_ptr + rows[:, None] * stride_tm + r64[None, :] * stride_tr, t, mask=mask_t)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    b = tl.load(
        b_ptr + r64[:, None] * stride_br + n64[None, :] * stride_bn,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    y = tl.dot(t, b, input_precision="tf32" if ALLOW_TF32 else "ieee")
    if HAS_BIAS:
        y += tl.load(bias_ptr + n64 * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + n64[None, :] * stride_yn,
        y.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


_SHRINK = {
    bound: autotune(
        configs,
        _INTERPRETER_SHRINK,
        ["K", "RP", "stride_xk", "stride_ak", "stride_ar"],
        {"stride_xk": unit_stride, "stride_ak": unit_stride, "stride_ar": unit_stride},
    )(_shrink_kernel)
    for bound, configs in SHRINK_TIERS.items()
}
_EXPAND = {
    bound: autotune(
        configs,
        _INTERPRETER_EXPAND,
        ["N", "RP", "S", "HAS_BIAS", "STORE_T", "stride_br", "stride_bn"],
        {"stride_br": unit_stride, "stride_bn": unit_stride},
    )(_expand_kernel)
    for bound, configs in EXPAND_TIERS.items()
}


def tier_for_rank(rp: int) -> int:
    """The tier (``SHRINK_TIERS``/``EXPAND_TIERS`` key) serving padded rank ``rp`` (≤ 512)."""
    return min(bound for bound in SHRINK_TIERS if rp <= bound)


def k_splits(k_dim: int, sms: int) -> int:
    """Shrink programs: at most one per SM and ``MAX_K_SPLITS``, each with ≥ MIN_K_PER_SPLIT
    columns of K."""
    return max(1, min(sms, MAX_K_SPLITS, triton.cdiv(k_dim, MIN_K_PER_SPLIT)))


def decode_chain(
    x: Tensor,
    layout: RowLayout,
    a: Tensor,
    b: Tensor,
    bias: Tensor | None,
    y2: Tensor,
    t2: Tensor | None,
) -> None:
    """Write ``y2 = (x·a)·b + bias`` [M, N] and, if given, ``t2 = x·a`` [M, R] (M ≤ MAX_ROWS).

    x: [..., K] read through ``layout`` (``plrd_kernels.layout.row_layout(x)``); a: [K, R]
    with RP ≤ the chain's chunk size; b: [R, N]; y2, t2 contiguous, x's dtype.
    """
    k_dim, r_dim = a.shape
    n_dim = b.shape[1]
    m_dim = layout.rows
    splits = k_splits(k_dim, num_sms(x.device))
    k_split = triton.cdiv(k_dim, splits)
    partials = new_buffer(x, (splits, m_dim, r_dim), torch.float32)
    rp, tf32 = padded_rank(r_dim), tf32_allowed(x.dtype)
    tier = tier_for_rank(rp)
    launch(
        _SHRINK[tier].for_dtype(x.dtype),
        (splits,),
        x, a, partials,
        m_dim, k_dim, r_dim, layout.inner, k_split,
        layout.stride0, layout.stride1, x.stride(-1),
        a.stride(0), a.stride(1),
        partials.stride(0), partials.stride(1),
        RP=rp, ALLOW_TF32=tf32, BLOCK_M=MAX_ROWS,
    )  # fmt: skip
    t_out = y2 if t2 is None else t2
    launch(
        _EXPAND[tier].for_dtype(b.dtype),
        lambda meta: (torch.sym_max(1, triton.cdiv(n_dim, meta["BLOCK_N"])),),  # 1: T, if N = 0
        partials, b, y2 if bias is None else bias, y2, t_out,
        m_dim, n_dim, r_dim, splits,
        partials.stride(0), partials.stride(1),
        b.stride(0), b.stride(1),
        0 if bias is None else bias.stride(0),
        y2.stride(0), y2.stride(1),
        t_out.stride(0), t_out.stride(1),
        HAS_BIAS=bias is not None, STORE_T=t2 is not None, RP=rp, ALLOW_TF32=tf32,
        BLOCK_M=MAX_ROWS,
    )  # fmt: skip
