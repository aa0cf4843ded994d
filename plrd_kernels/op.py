"""Public entry point ``lowrank_linear`` and its dispatch between the torch and Triton paths."""

from __future__ import annotations

from torch import Tensor

from plrd_kernels.backend import requested_backend
from plrd_kernels.reference import lowrank_linear_reference


def _check_shapes(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None) -> None:
    if down.dim() != 2 or up.dim() != 2:
        raise ValueError(
            f"down and up must be 2-D, got down {tuple(down.shape)} and up {tuple(up.shape)}"
        )
    rank, in_features = down.shape
    out_features, up_rank = up.shape
    if up_rank != rank:
        raise ValueError(
            f"rank mismatch: down is {tuple(down.shape)} (rank {rank}) but up is "
            f"{tuple(up.shape)} (rank {up_rank}); up must be [out, rank]"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features in its last dim {tuple(x.shape)}, "
            f"but down expects {in_features} (down is {tuple(down.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def lowrank_linear(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = (x @ downᵀ) @ upᵀ + bias``, differentiable in every input.

    x: [..., in]; down: [rank, in]; up: [out, rank]; bias: [out] or None → y: [..., out].
    The backend follows ``PLRD_BACKEND`` (auto | triton | torch).
    """
    _check_shapes(x, down, up, bias)
    backend = requested_backend()
    if backend == "triton":
        raise NotImplementedError(
            "PLRD_BACKEND=triton: the Triton kernels are not available yet; "
            "use PLRD_BACKEND=torch or auto"
        )
    return lowrank_linear_reference(x, down, up, bias)
