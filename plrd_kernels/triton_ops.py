"""The kernels as ``torch.library`` ops with autograd, so ``torch.compile`` traces them whole.

Ops (namespace ``plrd``):

- ``plrd::chain(x, a, b, bias, store_y, store_t) -> (y, t)``: ``t = x·a``, ``y = t·b + bias``
  (``plrd_kernels.chain``). Differentiable in x, a, b, bias; ``t`` is an auxiliary output
  (saved for the backward) and is not differentiable.
- ``plrd::reduce_rows(lhs, rhs, with_sum) -> (c, s)``: ``c = lhsᵀ·rhs``, ``s = Σ_rows lhs``
  (``plrd_kernels.grads``); used by the backward only.

Backward of the chain, given dY (every product a Triton kernel, no torch matmul)::

    dT, dX = chain(dY, bᵀ, aᵀ)     one launch: dT = dY·bᵀ kept in registers, dX = dT·aᵀ
    d b    = Tᵀ·dY  and  d bias = Σ dY    one reduction over rows (+ split sum)
    d a    = xᵀ·dT                         one reduction over rows (+ split sum)

T is saved by the forward rather than recomputed: it is M×R, small next to x (M×K), and
recomputing it would read x again and redo 2·M·K·R FLOPs (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from plrd_kernels.chain import chain
from plrd_kernels.grads import reduce_rows


@triton_op("plrd::chain", mutates_args=())
def chain_op(
    x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, store_y: bool, store_t: bool
) -> tuple[Tensor, Tensor]:
    """``(y, t)`` with ``t = x·a`` [M, R] and ``y = t·b + bias`` [..., N]; see ``chain``."""
    return chain(x, a, b, bias, store_y=store_y, store_t=store_t)


@triton_op("plrd::reduce_rows", mutates_args=())
def reduce_rows_op(lhs: Tensor, rhs: Tensor, with_sum: bool) -> tuple[Tensor, Tensor]:
    """``(lhsᵀ·rhs, Σ_rows lhs)`` over the leading dims; see ``reduce_rows``."""
    return reduce_rows(lhs, rhs, with_sum=with_sum)


def _setup_context(ctx, inputs, output) -> None:
    x, a, b, bias, _store_y, store_t = inputs
    _y, t = output
    ctx.mark_non_differentiable(t)
    # x is read again only for d a (= xᵀ·dT); do not keep it alive otherwise.
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, a, b, t)
    ctx.has_bias = bias is not None
    ctx.has_t = store_t


def _grad_weight(lhs_rows: Tensor, rhs_rows: Tensor, weight: Tensor) -> Tensor:
    """Gradient of ``weight`` [P, Q] = ``lhs_rowsᵀ·rhs_rows``, produced in the layout that
    makes the weight's own storage contiguous: for a transposed view (stride(0) == 1, e.g.
    ``down.t()``) the kernel writes ``rhs_rowsᵀ·lhs_rows`` and the transpose is a view."""
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return reduce_rows_op(rhs_rows, lhs_rows, False)[0].t()
    return reduce_rows_op(lhs_rows, rhs_rows, False)[0]


def _backward(ctx, grad_y: Tensor, _grad_t: Tensor | None):
    x, a, b, t = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
    grad_x = grad_a = grad_b = grad_bias = None
    if need_x or need_a:
        grad_x, grad_t = chain_op(grad_y, b.t(), a.t(), None, need_x, need_a)
        if not need_x:
            grad_x = None
        if need_a:
            grad_a = _grad_weight(x, grad_t, a)
    if need_b:
        if not ctx.has_t:
            raise RuntimeError("plrd::chain: b needs a gradient, so call it with store_t=True")
        # d b = Tᵀ·dY [R, N]; the kernel writes dYᵀ·T [N, R] (up's own layout) and, in the
        # same pass, the column sums of dY (the bias gradient).
        grad_b_t, col_sum = reduce_rows_op(grad_y, t, need_bias and ctx.has_bias)
        grad_b = grad_b_t.t()
        if need_bias and ctx.has_bias:
            grad_bias = col_sum
    elif need_bias and ctx.has_bias:
        grad_bias = reduce_rows_op(grad_y, grad_y[..., :0], True)[1]
    return grad_x, grad_a, grad_b, grad_bias, None, None


chain_op.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear_triton(
    x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``(x·downᵀ)·upᵀ + bias`` on the Triton kernels, forward and backward.

    Shapes as ``plrd_kernels.lowrank_linear``; all tensors one dtype and device.
    T is written out only when ``up`` needs its gradient.
    """
    save_t = torch.is_grad_enabled() and up.requires_grad
    y, _t = chain_op(x, down.t(), up.t(), bias, True, save_t)
    return y
