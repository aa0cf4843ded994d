"""The fused chain ``Y = (X·A)·B + bias``: one kernel for the forward and for dX.

Math, with X [M, K], A [K, R], B [R, N], bias [N]::

    T = X·A            [M, R]   fp32 accumulation over K, kept in registers
    Y = T·B + bias     [M, N]   T rounded to the input dtype first (as two torch matmuls do)

Forward: ``X = x, A = downᵀ, B = upᵀ`` and T is optionally written out (saved for d up).
Backward: ``X = dY, A = up, B = down`` gives ``T = dT = dY·up`` and ``Y = dX = dT·down``;
dT is written out for d down. The transposes are strides, never copies.

Ranks above ``MAX_CHUNK`` (512 for 16-bit inputs, 256 for fp32: what registers and shared
memory hold) are cut into column chunks of A (rows of B): ``Y = Σ_c (X·A_c)·B_c``, one
launch per chunk. The running sum lives in two fp32 buffers used in turn: chunk c reads the
sum of chunks < c from one and writes the sum up to c to the other (the last chunk writes Y),
so no launch reads what it writes, and the autotuner may rerun any launch (it does, on the
first call of a shape) without changing the result (docs/kernels.md §4).

Up to ``decode.MAX_ROWS`` rows with one chunk go to the split-K decode path
(``plrd_kernels.decode``) instead.

Reference: ``plrd_kernels.reference.chain_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plrd_kernels import decode
from plrd_kernels.layout import m_bucket, new_buffer, padded_rank, row_layout
from plrd_kernels.tuning import autotune, config, launch, num_sms, tf32_allowed, unit_stride

# Block sizes by padded rank RP: the T accumulator is BLOCK_M × RP fp32 in registers and the
# B tile RP × BLOCK_N in shared memory, so a larger rank takes fewer rows and columns. Each
# list ends with its smallest config, which fits in shared memory for fp32 too; it is the one
# used with PLRD_AUTOTUNE=0. num_stages 4–5 pipeline the K loop deeper (benchmarks/NOTES.md).
_CONFIGS_RANK_64 = [
    config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    config(4, 5, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
    config(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
]
_CONFIGS_RANK_256 = [
    config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
    config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
]
_CONFIGS_RANK_512 = [  # a 32 × 512 fp32 accumulator is 64 KiB of registers
    config(8, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    config(8, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64),
    config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
    config(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
_INTERPRETER_CONFIGS = [
    config(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
    config(4, 1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
]
_STRIDES = ["stride_xk", "stride_ak", "stride_ar", "stride_br", "stride_bn"]
_KEY = ["M", "K", "N", "RP", "STORE_Y", "STORE_T", "LOAD_ACC", *_STRIDES]
"""Autotune key. M enters as its power-of-two bucket and each stride as "is it 1", so the
forward (A = downᵀ, B = upᵀ) and dX (A = up, B = down) chains tune apart even when K == N."""
_BUCKETS = {"M": m_bucket, **{name: unit_stride for name in _STRIDES}}

MAX_CHUNK = {2: 512, 4: 256}
"""Largest padded rank one launch holds, by input element size in bytes."""

TIERS = {64: _CONFIGS_RANK_64, 256: _CONFIGS_RANK_256, 512: _CONFIGS_RANK_512}
"""Autotune configs by padded-rank tier: a tier serves the ranks RP ≤ its key."""


# long: one GPU program's whole walk (T in registers across the K loop, then the N tiles); a
# split into @triton.jit helpers would pass the tile state through many arguments for no gain
@triton.jit
def _chain_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, acc_ptr, t_ptr,
    M, K, N, R, M_INNER,
    stride_x0, stride_x1, stride_xk,
    stride_ak, stride_ar,
    stride_br, stride_bn,
    stride_bias,
    stride_ym, stride_yn,
    stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr, STORE_T: tl.constexpr,
    LOAD_ACC: tl.constexpr, RP: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (i, j) owns rows ``[i·BLOCK_M, (i+1)·BLOCK_M)``: it builds their T in registers,
    then writes Y for the N tiles ``j, j + S, j + 2S, ...`` where ``S = num_programs(1)``.

    Arguments:
        x_ptr: X [M, K], row m at ``(m // M_INNER)·stride_x0 + (m % M_INNER)·stride_x1``.
        a_ptr: A [K, R] at ``k·stride_ak + r·stride_ar``.
        b_ptr: B [R, N] at ``r·stride_br + n·stride_bn``.
        bias_ptr: bias [N] at ``n·stride_bias`` (read only if HAS_BIAS).
        y_ptr: Y [M, N] at ``m·stride_ym + n·stride_yn``, written if STORE_Y (any float type).
        acc_ptr: fp32 [M, N] with Y's strides, added to Y if LOAD_ACC (rank chunks after the
            first; the caller passes the bias to the first chunk only). Never the same
            memory as y_ptr: a launch must not read what it writes (module notes).
        t_ptr: T [M, R] at ``m·stride_tm + r·stride_tr``, written by the j = 0 programs if
            STORE_T. T is rounded to X's dtype before the second product, as torch would.
        M, K, N, R: problem sizes (any R ≥ 1; R ≤ RP).
        M_INNER: inner size of the two-level row index (see ``plrd_kernels.layout``).
        RP: R padded to a power of two ≥ 16 (masked loads give zeros past R).
        ALLOW_TF32: ``tl.dot`` input precision "tf32" if set, else "ieee" (exact fp32); only
            fp32 inputs care.
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
        acc_t = tl.dot(x, a, acc_t, input_precision="tf32" if ALLOW_TF32 else "ieee")
    t = acc_t.to(x_ptr.dtype.element_ty)

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
            y = tl.dot(t, b, input_precision="tf32" if ALLOW_TF32 else "ieee")
            if HAS_BIAS:
                bias = tl.load(bias_ptr + n64 * stride_bias, mask=mask_n, other=0.0)
                y += bias.to(tl.float32)[None, :]
            y_offs = rows[:, None] * stride_ym + n64[None, :] * stride_yn
            mask_y = mask_m[:, None] & mask_n[None, :]
            if LOAD_ACC:
                y += tl.load(acc_ptr + y_offs, mask=mask_y, other=0.0)
            tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=mask_y)


TUNED = {
    bound: autotune(configs, _INTERPRETER_CONFIGS, _KEY, _BUCKETS)(_chain_kernel)
    for bound, configs in TIERS.items()
}
"""The autotuners of each tier (the same kernel with the tier's configs; ``for_dtype``)."""


def tier_for_rank(rp: int) -> int:
    """The ``TIERS`` key whose configs serve padded rank ``rp`` (≤ 512)."""
    return min(bound for bound in TIERS if rp <= bound)


def n_splits(m_blocks: int, n_tiles: int, sms: int) -> int:
    """Programs per row block (split N): ``max(1, min(n_tiles, sms // m_blocks))``, so N is
    split only when the row blocks fill at most half the SMs (each split recomputes T and
    re-reads X's rows). ``m_blocks`` may be symbolic: sym_min/sym_max add no guard."""
    return torch.sym_max(1, torch.sym_min(n_tiles, sms // m_blocks))


def rank_chunks(rank: int, element_size: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]``: the rank columns each launch handles (one chunk up to MAX_CHUNK)."""
    size = MAX_CHUNK[min(max(element_size, 2), 4)]
    if rank == 0:
        return [(0, 0)]
    return [(r0, min(r0 + size, rank)) for r0 in range(0, rank, size)]


def chain(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Tensor | None = None,
    *,
    store_y: bool = True,
    store_t: bool = False,
) -> tuple[Tensor, Tensor]:
    """``T = x·a`` and ``Y = T·b + bias``: one launch per rank chunk (module notes), or the
    decode path for a few rows.

    x: [..., K] (any strides); a: [K, R]; b: [R, N]; bias: [N] or None; all one dtype.
    Returns ``(y, t)``: y [..., N] contiguous (an empty tensor unless ``store_y``) and
    t [M, R] contiguous with ``M = prod(x.shape[:-1])`` (empty unless ``store_t``).
    M may be symbolic (``torch.compile(dynamic=True)``): nothing here turns it into an int.
    """
    rank, n_dim = a.shape[1], b.shape[1]
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
    chunks = rank_chunks(rank, x.element_size())
    if store_y and len(chunks) == 1 and m_dim <= decode.MAX_ROWS:
        decode.decode_chain(x, layout, a, b, bias, y2, t2 if store_t else None)
        return y, t
    # Running sums of the rank chunks: chunk c reads sums[(c - 1) % 2], writes sums[c % 2].
    n_sums = min(2, len(chunks) - 1) if store_y else 0
    sums = [new_buffer(x, (m_dim, n_dim), torch.float32) for _ in range(n_sums)]
    for index, (r0, r1) in enumerate(chunks):
        first, last = index == 0, index == len(chunks) - 1
        _launch_chunk(
            x, layout, a[:, r0:r1], b[r0:r1, :], bias if first else None,
            y2 if last or not store_y else sums[index % 2],
            y2 if first else sums[(index - 1) % 2],
            t2[:, r0:r1] if store_t else t2,
            store_y=store_y, store_t=store_t, load_acc=store_y and not first,
        )  # fmt: skip
    return y, t


def _launch_chunk(x, layout, a_c, b_c, bias, out, acc, t_c, *, store_y, store_t, load_acc) -> None:
    """One chain launch over the rank columns of ``a_c``/``b_c``: ``out = x·a_c·b_c (+ bias)
    (+ acc if load_acc)``; ``t_c`` gets ``x·a_c`` if ``store_t``. ``acc`` is read only with
    ``load_acc``, and then it is never ``out``."""
    m_dim, k_dim = layout.rows, a_c.shape[0]
    n_dim, r_dim = b_c.shape[1], a_c.shape[1]
    sms = num_sms(x.device)

    def grid(meta):
        m_blocks = triton.cdiv(m_dim, meta["BLOCK_M"])
        if not store_y:
            return (m_blocks, 1)
        return (m_blocks, n_splits(m_blocks, triton.cdiv(n_dim, meta["BLOCK_N"]), sms))

    rp = padded_rank(r_dim)
    launch(
        TUNED[tier_for_rank(rp)].for_dtype(x.dtype),
        grid,
        x, a_c, b_c, out if bias is None else bias, out, acc, t_c,
        m_dim, k_dim, n_dim, r_dim, layout.inner,
        layout.stride0, layout.stride1, x.stride(-1),
        a_c.stride(0), a_c.stride(1),
        b_c.stride(0), b_c.stride(1),
        0 if bias is None else bias.stride(0),
        out.stride(0), out.stride(1),
        t_c.stride(0), t_c.stride(1),
        HAS_BIAS=bias is not None, STORE_Y=store_y, STORE_T=store_t, LOAD_ACC=load_acc,
        RP=rp, ALLOW_TF32=tf32_allowed(x.dtype),
    )  # fmt: skip
