"""The fused chain ``Y = (X·A)·B + bias``: one kernel for the forward and for dX.

Math, with X [M, K], A [K, R], B [R, N], bias [N]::

    T = X·A            [M, R]   fp32 accumulation over K, kept in registers
    Y = T·B + bias     [M, N]   T rounded to the input dtype first (as two torch matmuls do)

Forward: ``X = x, A = downᵀ, B = upᵀ`` and T is optionally written out (saved for d up).
Backward: ``X = dY, A = up, B = down`` gives ``T = dT = dY·up`` and ``Y = dX = dT·down``;
dT is written out for d down. The transposes are strides, never copies.

Reference: ``plrd_kernels.reference.lowrank_linear_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plrd_kernels.layout import m_bucket, new_buffer, padded_rank, row_layout
from plrd_kernels.tuning import autotune, config, dot_precision, launch, num_sms

# Block sizes by padded rank RP: the T accumulator is BLOCK_M × RP fp32 in registers and the
# B tile RP × BLOCK_N in shared memory, so a larger rank takes fewer rows and columns.
_CONFIGS_RANK_64 = [
    config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
    config(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128),
]
_CONFIGS_RANK_256 = [
    config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    config(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64),
]
_CONFIGS_RANK_LARGE = [
    config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    config(8, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
    config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
_INTERPRETER_CONFIG = config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
_KEY = ["M_BUCKET", "K", "N", "RP", "STORE_Y", "STORE_T"]


@triton.jit
def _chain_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr,
    M, K, N, R, M_INNER, M_BUCKET,
    stride_x0, stride_x1, stride_xk,
    stride_ak, stride_ar,
    stride_br, stride_bn,
    stride_bias,
    stride_ym, stride_yn,
    stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr, STORE_T: tl.constexpr,
    RP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (i, j) owns rows ``[i·BLOCK_M, (i+1)·BLOCK_M)``: it builds their T in registers,
    then writes Y for the N tiles ``j, j + S, j + 2S, ...`` where ``S = num_programs(1)``.

    Arguments:
        x_ptr: X [M, K], row m at ``(m // M_INNER)·stride_x0 + (m % M_INNER)·stride_x1``.
        a_ptr: A [K, R] at ``k·stride_ak + r·stride_ar``.
        b_ptr: B [R, N] at ``r·stride_br + n·stride_bn``.
        bias_ptr: bias [N] at ``n·stride_bias`` (read only if HAS_BIAS).
        y_ptr: Y [M, N] at ``m·stride_ym + n·stride_yn``, written if STORE_Y; its element type
            is the compute dtype (T is rounded to it before the second product).
        t_ptr: T [M, R] at ``m·stride_tm + r·stride_tr``, written by the j = 0 programs if
            STORE_T.
        M, K, N, R: problem sizes (any R ≥ 1; R ≤ RP).
        M_INNER: inner size of the two-level row index (see ``plrd_kernels.layout``).
        M_BUCKET: M rounded to a power of two; unused by the body, it is the autotune key.
        RP: R padded to a power of two ≥ 16 (masked loads give zeros past R).
        PRECISION: ``tl.dot`` input precision ("ieee" or "tf32"; only fp32 inputs care).
        BLOCK_M, BLOCK_N, BLOCK_K: tile sizes (each ≥ 16).

    Offsets are computed in int64, so tensors over 2³¹ elements are addressed correctly.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_split = tl.num_programs(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    x_rows = (rows // M_INNER) * stride_x0 + (rows % M_INNER) * stride_x1
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    r64 = offs_r.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    acc_t = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
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
        acc_t = tl.dot(x, a, acc_t, input_precision=PRECISION)
    t = acc_t.to(y_ptr.dtype.element_ty)

    if STORE_T:
        if pid_n == 0:
            tl.store(
                t_ptr + rows[:, None] * stride_tm + r64[None, :] * stride_tr,
                t,
                mask=mask_m[:, None] & mask_r[None, :],
            )

    if STORE_Y:
        n_tiles = tl.cdiv(N, BLOCK_N)
        for tile in range(pid_n, n_tiles, n_split):
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            n64 = offs_n.to(tl.int64)
            b = tl.load(
                b_ptr + r64[:, None] * stride_br + n64[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            y = tl.dot(t, b, input_precision=PRECISION)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + n64 * stride_bias, mask=mask_n, other=0.0)
                y += bias.to(tl.float32)[None, :]
            tl.store(
                y_ptr + rows[:, None] * stride_ym + n64[None, :] * stride_yn,
                y.to(y_ptr.dtype.element_ty),
                mask=mask_m[:, None] & mask_n[None, :],
            )


_chain_rank_64 = autotune(_CONFIGS_RANK_64, _INTERPRETER_CONFIG, _KEY)(_chain_kernel)
_chain_rank_256 = autotune(_CONFIGS_RANK_256, _INTERPRETER_CONFIG, _KEY)(_chain_kernel)
_chain_rank_large = autotune(_CONFIGS_RANK_LARGE, _INTERPRETER_CONFIG, _KEY)(_chain_kernel)


def _kernel_for_rank(rp: int):
    if rp <= 64:
        return _chain_rank_64
    if rp <= 256:
        return _chain_rank_256
    return _chain_rank_large


def chain(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Tensor | None = None,
    *,
    store_y: bool = True,
    store_t: bool = False,
) -> tuple[Tensor, Tensor]:
    """``T = x·a`` and ``Y = T·b + bias`` in one launch.

    x: [..., K] (any strides); a: [K, R]; b: [R, N]; bias: [N] or None; all one dtype.
    Returns ``(y, t)``: y [..., N] contiguous (an empty tensor unless ``store_y``) and
    t [M, R] contiguous with ``M = prod(x.shape[:-1])`` (empty unless ``store_t``).
    """
    k_dim, rank = a.shape
    n_dim = b.shape[1]
    lead = x.shape[:-1]
    layout = row_layout(x)
    if layout is None:  # ≥ 3 leading dims that do not merge into two levels
        x = x.contiguous()
        layout = row_layout(x)
    m_dim = layout.rows
    y = new_buffer(x, (*lead, n_dim) if store_y else (0,))
    t = new_buffer(x, (m_dim, rank) if store_t else (0,))
    if m_dim == 0 or (n_dim == 0 and not store_t) or not (store_y or store_t):
        return y, t
    y2 = y.view(m_dim, n_dim) if store_y else x.new_empty((1, 1))
    t2 = t if store_t else x.new_empty((1, 1))
    if bias is None:
        bias_arg, bias_stride = y2, 0
    else:
        bias_arg, bias_stride = bias, bias.stride(0)

    rp = padded_rank(rank)
    sms = num_sms(x.device)

    def grid(meta):
        m_blocks = triton.cdiv(m_dim, meta["BLOCK_M"])
        if not store_y:
            return (m_blocks, 1)
        # Split N only when the row blocks fill at most half the SMs (each split recomputes T).
        split = max(1, min(triton.cdiv(n_dim, meta["BLOCK_N"]), sms // m_blocks))
        return (m_blocks, split)

    launch(
        _kernel_for_rank(rp),
        grid,
        x, a, b, bias_arg, y2, t2,
        m_dim, k_dim, n_dim, rank, layout.inner, m_bucket(m_dim),
        layout.stride0, layout.stride1, x.stride(-1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        bias_stride,
        y2.stride(0), y2.stride(1),
        t2.stride(0), t2.stride(1),
        HAS_BIAS=bias is not None, STORE_Y=store_y, STORE_T=store_t,
        RP=rp, PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return y, t


def chain_reference(
    x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Torch twin of :func:`chain` (T rounded to the input dtype, as the kernel does)."""
    t = torch.matmul(x.reshape(-1, a.shape[0]).float(), a.float()).to(x.dtype)
    y = torch.matmul(t.float(), b.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], b.shape[1]), t
