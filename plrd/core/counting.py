"""Parameter counting: shared (tied) tensors counted once; per-layer counts for allocation."""

from __future__ import annotations

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``; a tensor reachable under several names counts once.

    Two parameters are the same when they are the same object or views of the same storage
    with the same offset and shape (e.g. ``lm_head.weight`` tied to ``embed_tokens.weight``).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"count_parameters needs a torch.nn.Module, got {type(model).__name__}; pass the "
            "model object itself"
        )
    seen: set[tuple] = set()
    total = 0
    for p in model.parameters():
        if p.device.type == "meta":
            key = ("meta", id(p))
        else:
            key = _storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def dense_params(in_features: int, out_features: int, bias: bool) -> int:
    """Parameters of a dense layer: ``in·out (+ out)``."""
    return in_features * out_features + (out_features if bias else 0)


def lowrank_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of a rank-r factored layer: ``r·(in+out) (+ out)``."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def format_params(n: int) -> str:
    """A parameter count with a unit and one decimal: 134.5M, 206.4K, 1.2B, 950."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
