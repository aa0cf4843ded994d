"""Plain-torch low-rank linear: the CPU path and the test oracle.

Math (DESIGN §4): with x [M, K] (leading dims flattened), down [R, K], up [N, R]::

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
from torch import Tensor


def lowrank_linear_reference(
    x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``(x @ downᵀ) @ upᵀ + bias`` with two torch matmuls; autograd gives the backward.

    x: [..., K]; down: [R, K]; up: [N, R]; bias: [N] or None. Returns [..., N].
    """
    hidden = torch.matmul(x, down.t())
    if bias is None:
        return torch.matmul(hidden, up.t())
    return torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]), up.t()).reshape(
        *x.shape[:-1], up.shape[0]
    )
