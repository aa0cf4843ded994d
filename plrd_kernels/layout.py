"""Shape and stride bookkeeping shared by the host side of the kernels (no Triton import).

The kernels see a tensor ``t`` of shape ``[..., F]`` as a matrix of ``M = prod(leading dims)``
rows. Row ``m`` is addressed as ``(m // inner) * stride0 + (m % inner) * stride1``: two levels
cover every 3-D tensor whatever its strides (transposed batch/sequence views, stride-0
expands) and every higher-rank tensor whose leading dims merge into two, so no copy is made.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

MIN_DOT = 16  # smallest tile side tl.dot accepts
MAX_M_BUCKET = 1 << 15  # autotune key: M rounded up to a power of two, capped here

OUTPUT_FILL: float | None = None
"""Value that every kernel output and workspace is filled with before the launch (``None``:
left uninitialised). Tests set NaN, so an element a kernel fails to write shows up."""


def new_buffer(like: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor on ``like``'s device for a kernel to write (see ``OUTPUT_FILL``)."""
    dtype = like.dtype if dtype is None else dtype
    if OUTPUT_FILL is None:
        return like.new_empty(shape, dtype=dtype)
    return like.new_full(shape, OUTPUT_FILL, dtype=dtype)


class RowLayout(NamedTuple):
    """Rows of a ``[..., F]`` tensor: ``rows`` in all, address ``(m//inner)*s0 + (m%inner)*s1``."""

    rows: int
    inner: int
    stride0: int
    stride1: int


def row_layout(t: Tensor) -> RowLayout | None:
    """Describe the leading dims of ``t`` as at most two strided levels; ``None`` if impossible.

    Size-1 dims are dropped; neighbours ``(a, sa), (b, sb)`` merge when ``sa == sb * b``
    (this also merges stride-0 runs).
    """
    merged: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    rows = math.prod(t.shape[:-1])
    if not merged:
        return RowLayout(rows, 1, 0, 0)
    if len(merged) == 1:
        return RowLayout(rows, rows, 0, merged[0][1])
    if len(merged) == 2:
        return RowLayout(rows, merged[1][0], merged[0][1], merged[1][1])
    return None


def next_power_of_two(n: int) -> int:
    """Smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_rank(rank: int) -> int:
    """Rank as the kernels hold it: a power of two ≥ 16 (``tl.dot`` needs both)."""
    return max(MIN_DOT, next_power_of_two(rank))


def m_bucket(rows: int) -> int:
    """Autotune key for the row count: next power of two, in [16, 2¹⁵], so batch shapes share."""
    return max(MIN_DOT, min(next_power_of_two(rows), MAX_M_BUCKET))
