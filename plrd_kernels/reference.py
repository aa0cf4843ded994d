"""Plain-torch twins of the kernels: the fallback path (``PLRD_BACKEND=torch``, CPU) and the
test oracles. No Triton here.

Math (docs/kernels.md §1): with x [M, K] (leading dims flattened), down [R, K], up [N, R]::

    T = x · downᵀ          [M, R]
    Y = T · upᵀ + bias     [M, N]

Backward, given dY [M, N]::

    dT = dY · up           [M, R]
    dX = dT · down         [M, K]
    d down = dTᵀ · x       [R, K]
    d up   = dYᵀ · T       [N, R]
    d bias = Σ_M dY        [N]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_linear_reference(
    x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``(x @ downᵀ) @ upᵀ + bias`` with two torch matmuls; autograd gives the backward.

    x: [..., K]; down: [R, K]; up: [N, R]; bias: [N] or None. Returns [..., N]. ``F.linear``
    takes the weights as stored (no transposed views) and adds the bias in the second GEMM;
    at one row (decoding) that is about a fifth cheaper per call than ``matmul`` + ``addmm``.
    """
    return F.linear(F.linear(x, down), up, bias)


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``‖value − reference‖_F / ‖reference‖_F`` in float64 (0 when both are zero)."""
    value, reference = value.detach().double(), reference.detach().double()
    denom = reference.norm().item()
    diff = (value - reference).norm().item()
    return diff if denom == 0.0 else diff / denom


def lowrank_linear_grads_reference(
    x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, grad_y: Tensor
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """Float64 oracle: ``(y, (dx, d down, d up, d bias))`` for output gradient ``grad_y``.

    Inputs of any dtype are upcast to float64 first; d bias is None without a bias.
    """
    leaves = [t.detach().double().requires_grad_() for t in (x, down, up)]
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    y = lowrank_linear_reference(*leaves, bias64)
    inputs = leaves + ([] if bias64 is None else [bias64])
    grads = torch.autograd.grad(y, inputs, grad_y.detach().double())
    return y.detach(), ((*grads, None) if bias64 is None else tuple(grads))


def chain_reference(
    x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Torch twin of ``plrd_kernels.chain.chain``: ``T = x·a``, ``Y = T·b + bias`` with fp32
    products and T rounded to the input dtype in between, as the kernel does.

    x: [..., K]; a: [K, R]; b: [R, N]; bias: [N] or None. Returns (y [..., N], t [M, R]).
    """
    t = torch.matmul(x.reshape(-1, a.shape[0]).float(), a.float()).to(x.dtype)
    y = torch.matmul(t.float(), b.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], b.shape[1]), t
