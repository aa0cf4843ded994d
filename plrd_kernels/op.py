"""Public entry point ``lowrank_linear`` and its dispatch between the torch and Triton paths.

The Triton modules are imported on the first call that needs them, not with this module:
``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a kernel, so a process (a test
session, say) can still switch the interpreter on after ``import plrd_kernels``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plrd_kernels.backend import choose_backend, requested_backend
from plrd_kernels.reference import lowrank_linear_reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_shapes(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None) -> None:
    if down.dim() != 2 or up.dim() != 2:
        raise ValueError(
            f"down and up must be 2-D, got down {tuple(down.shape)} and up {tuple(up.shape)}"
        )
    if x.dim() < 1:
        raise ValueError("input must have at least one dim (its last dim is in_features)")
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


def _kernel_inputs(
    x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Apply autocast (as torch's matmul would) and check dtypes and devices for the kernels."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, down, up = x.to(dtype), down.to(dtype), up.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    named = {"x": x, "down": down, "up": up}
    if bias is not None:
        named["bias"] = bias
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"lowrank_linear on Triton needs x, down, up and bias in one of float32, float16, "
            f"bfloat16, got {', '.join(f'{n} {d}' for n, d in dtypes.items())}; cast them "
            "to one dtype (or use PLRD_BACKEND=torch)"
        )
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(
            f"lowrank_linear needs all tensors on one device, got "
            f"{', '.join(f'{n} on {d}' for n, d in devices.items())}"
        )
    return x, down, up, bias


def _triton_path():
    """The Triton ops module, imported on first use (see the module docstring)."""
    # lazy: importing Triton and registering the ops costs seconds the torch path never needs
    from plrd_kernels import triton_ops, tuning

    return triton_ops, tuning.INTERPRET


def _torch_path(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None) -> Tensor:
    """The two-matmul path, with the shapes checked only when torch refuses them.

    At one row per call (decoding on a CPU) the Python checks and the backend choice cost
    about a tenth of the call; torch checks the shapes anyway, so ours run only to turn its
    error into one that names the mismatch (benchmarks/NOTES.md §7).
    """
    if bias is not None and bias.shape != up.shape[:1]:
        _check_shapes(x, down, up, bias)  # a bias of shape (1,) would broadcast silently
    try:
        return lowrank_linear_reference(x, down, up, bias)
    except RuntimeError:
        _check_shapes(x, down, up, bias)
        raise


def lowrank_linear(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = (x @ downᵀ) @ upᵀ + bias``, differentiable in every input.

    x: [..., in]; down: [rank, in]; up: [out, rank]; bias: [out] or None → y: [..., out].
    Any leading dims and strides. The backend follows ``PLRD_BACKEND`` (auto | triton |
    torch, see ``plrd_kernels.backend``); on Triton every product of the forward and the
    backward runs in the fused kernels with fp32 accumulation.
    """
    if not x.is_cuda and requested_backend() != "triton":
        return _torch_path(x, down, up, bias)
    _check_shapes(x, down, up, bias)
    if choose_backend(x, down, up) == "torch":
        return lowrank_linear_reference(x, down, up, bias)
    x, down, up, bias = _kernel_inputs(x, down, up, bias)
    triton_ops, interpreted = _triton_path()
    if not x.is_cuda and not interpreted:
        raise RuntimeError(
            "the Triton kernels were loaded for the GPU (TRITON_INTERPRET was not 1 when they "
            "were first used), so they cannot run on CPU tensors in this process; set "
            "TRITON_INTERPRET=1 before the first call"
        )
    return triton_ops.lowrank_linear_triton(x, down, up, bias)
