"""Weight gradients: reductions over the rows M, ``C = Lᵀ·Q`` and ``s = Σ_m L``.

Math, with L [M, P] and Q [M, Q']::

    C[p, q] = Σ_m L[m, p] · Q[m, q]      [P, Q']   fp32 accumulation
    s[p]    = Σ_m L[m, p]                [P]       (optional; the bias gradient)

Uses: ``d up = dYᵀ·T`` (L = dY, Q = T, with s = d bias) and ``d down = dTᵀ·x`` (L = dT, Q = x).
M is long (all tokens) and P·Q' can be small, so M is split over S programs per output tile;
each writes an fp32 partial ``W[s]`` and a second kernel sums the S partials in a fixed order
(deterministic, no atomics). With S = 1 the first kernel writes the result directly.

Reference: ``plrd_kernels.reference.lowrank_linear_grads_reference`` (through the op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plrd_kernels.layout import m_bucket, new_buffer, row_layout
from plrd_kernels.tuning import autotune, config, launch, num_sms, tf32_allowed, unit_stride

_CONFIGS = [
    config(8, 3, BLOCK_P=128, BLOCK_Q=128, BLOCK_M=32),
    config(4, 3, BLOCK_P=64, BLOCK_Q=128, BLOCK_M=64),
    config(4, 3, BLOCK_P=128, BLOCK_Q=64, BLOCK_M=64),
    config(4, 4, BLOCK_P=64, BLOCK_Q=64, BLOCK_M=64),
]
_INTERPRETER_CONFIGS = [
    config(4, 1, BLOCK_P=32, BLOCK_Q=32, BLOCK_M=32),
    config(4, 1, BLOCK_P=16, BLOCK_Q=64, BLOCK_M=16),
]
SPLIT_TILE = 64  # tile side assumed when choosing the split count (before a config is picked)
MIN_ROWS_PER_SPLIT = 256
MAX_SPLITS = 64
_SUM_BLOCK = 1024


@triton.jit
def _reduce_rows_kernel(
    l_ptr, q_ptr, c_ptr, s_ptr,
    M, P, Q, L_INNER, Q_INNER,
    stride_l0, stride_l1, stride_lp,
    stride_q0, stride_q1, stride_qq,
    stride_cs, stride_cp, stride_cq,
    stride_ss, stride_sp,
    WITH_SUM: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program (i, j, s) sums rows of split s into the output tile (P block i, Q block j).

    Arguments:
        l_ptr: L [M, P], row m at ``(m // L_INNER)·stride_l0 + (m % L_INNER)·stride_l1``,
            column p at ``p·stride_lp``.
        q_ptr: Q [M, Q], likewise with Q_INNER, stride_q0, stride_q1, stride_qq.
        c_ptr: output [S, P, Q] at ``s·stride_cs + p·stride_cp + q·stride_cq``: fp32 partials
            when S > 1, else the result in its own dtype (stride_cs unused).
        s_ptr: column sums [S, P] at ``s·stride_ss + p·stride_sp``, written by the j = 0
            programs if WITH_SUM.
        M, P, Q: sizes; split s covers rows ``[s·C, (s+1)·C)``, C = ⌈⌈M/S⌉/BLOCK_M⌉·BLOCK_M.
        ALLOW_TF32: ``tl.dot`` input precision "tf32" if set, else "ieee" (fp32 inputs only).
        BLOCK_P, BLOCK_Q, BLOCK_M: tile sizes (each ≥ 16).

    A split with no rows still writes its (zero) partial, so every output element is written.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    p64 = offs_p.to(tl.int64)
    q64 = offs_q.to(tl.int64)

    chunk = tl.cdiv(tl.cdiv(M, n_splits), BLOCK_M) * BLOCK_M
    m_start = pid_s * chunk
    m_end = tl.minimum(m_start + chunk, M)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        rows = offs_m.to(tl.int64)
        l_rows = (rows // L_INNER) * stride_l0 + (rows % L_INNER) * stride_l1
        q_rows = (rows // Q_INNER) * stride_q0 + (rows % Q_INNER) * stride_q1
        lt = tl.load(
            l_ptr + l_rows[:, None] + p64[None, :] * stride_lp,
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        )
        qt = tl.load(
            q_ptr + q_rows[:, None] + q64[None, :] * stride_qq,
            mask=mask_m[:, None] & mask_q[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(lt), qt, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
        if WITH_SUM:
            acc_sum += tl.sum(lt.to(tl.float32), axis=0)

    split64 = pid_s.to(tl.int64)
    tl.store(
        c_ptr + split64 * stride_cs + p64[:, None] * stride_cp + q64[None, :] * stride_cq,
        acc.to(c_ptr.dtype.element_ty),
        mask=mask_p[:, None] & mask_q[None, :],
    )
    if WITH_SUM:
        if pid_q == 0:
            tl.store(
                s_ptr + split64 * stride_ss + p64 * stride_sp,
                acc_sum.to(s_ptr.dtype.element_ty),
                mask=mask_p,
            )


_reduce_rows = autotune(
    _CONFIGS,
    _INTERPRETER_CONFIGS,
    ["M", "P", "Q", "WITH_SUM", "stride_lp", "stride_qq"],
    {"M": m_bucket, "stride_lp": unit_stride, "stride_qq": unit_stride},
)(_reduce_rows_kernel)


@triton.jit
def _sum_splits_kernel(w_ptr, out_ptr, S, NUMEL, BLOCK: tl.constexpr):
    """``out[i] = Σ_s w[s·NUMEL + i]`` for i < NUMEL, summed in fp32 in the order s = 0, 1, ...

    Arguments:
        w_ptr: fp32 partials [S, NUMEL], contiguous.
        out_ptr: result [NUMEL], contiguous, any float dtype.
        S, NUMEL: number of partials and elements per partial.
        BLOCK: elements per program.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    ptrs = w_ptr + offs
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, S):
        total += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += NUMEL
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def split_count(rows: int, p_dim: int, q_dim: int, sms: int) -> int:
    """How many row splits: enough programs for about two per SM, at least
    ``MIN_ROWS_PER_SPLIT`` rows each, at most ``MAX_SPLITS``. ``rows`` may be symbolic:
    sym_min/sym_max keep the result symbolic instead of guarding on it."""
    tiles = triton.cdiv(p_dim, SPLIT_TILE) * triton.cdiv(q_dim, SPLIT_TILE)
    want = min(triton.cdiv(2 * sms, max(tiles, 1)), MAX_SPLITS)
    return torch.sym_max(1, torch.sym_min(want, triton.cdiv(rows, MIN_ROWS_PER_SPLIT)))


def reduce_rows(
    lhs: Tensor,
    rhs: Tensor,
    *,
    with_sum: bool = False,
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``C = lhsᵀ·rhs`` and optionally ``s = Σ_rows lhs``, reducing over the leading dims.

    lhs: [..., P]; rhs: [..., Q] with the same leading dims (any strides, stride 0 included),
    one dtype. Returns C [P, Q] contiguous in that dtype and s [P] (an empty tensor unless
    ``with_sum``). ``splits`` overrides the row-split count.
    """
    p_dim, q_dim = lhs.shape[-1], rhs.shape[-1]
    l_layout, q_layout = row_layout(lhs), row_layout(rhs)
    if l_layout is None:
        lhs = lhs.contiguous()
        l_layout = row_layout(lhs)
    if q_layout is None:
        rhs = rhs.contiguous()
        q_layout = row_layout(rhs)
    rows = l_layout.rows
    out = new_buffer(lhs, (p_dim, q_dim))
    col_sum = new_buffer(lhs, (p_dim,) if with_sum else (0,))
    if p_dim == 0 or (q_dim == 0 and not with_sum):
        return out, col_sum
    if rows == 0:
        return out.zero_(), col_sum.zero_()

    n_splits = splits or split_count(rows, p_dim, q_dim, num_sms(lhs.device))
    if n_splits == 1:
        c_buf, s_buf = out.unsqueeze(0), col_sum.view(1, -1)
    else:
        c_buf = new_buffer(lhs, (n_splits, p_dim, q_dim), torch.float32)
        s_buf = new_buffer(lhs, (n_splits, p_dim) if with_sum else (1, 1), torch.float32)
    if not with_sum:
        s_buf = c_buf[:, 0]  # never written (WITH_SUM is off)

    def grid(meta):
        return (
            triton.cdiv(p_dim, meta["BLOCK_P"]),
            max(1, triton.cdiv(q_dim, meta["BLOCK_Q"])),
            n_splits,
        )

    launch(
        _reduce_rows.for_dtype(lhs.dtype),
        grid,
        lhs, rhs, c_buf, s_buf,
        rows, p_dim, q_dim, l_layout.inner, q_layout.inner,
        l_layout.stride0, l_layout.stride1, lhs.stride(-1),
        q_layout.stride0, q_layout.stride1, rhs.stride(-1),
        c_buf.stride(0), c_buf.stride(1), c_buf.stride(2),
        s_buf.stride(0), s_buf.stride(1),
        WITH_SUM=with_sum, ALLOW_TF32=tf32_allowed(lhs.dtype),
    )  # fmt: skip
    if n_splits > 1:
        _sum_splits(c_buf, out)
        if with_sum:
            _sum_splits(s_buf, col_sum)
    return out, col_sum


def _sum_splits(partials: Tensor, out: Tensor) -> None:
    numel = out.numel()
    if numel == 0:
        return
    launch(
        _sum_splits_kernel,
        (triton.cdiv(numel, _SUM_BLOCK),),
        partials,
        out,
        partials.shape[0],
        numel,
        BLOCK=_SUM_BLOCK,
    )
