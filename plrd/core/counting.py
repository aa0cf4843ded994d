"""Parameter counting: a tensor shared (tied) under several names is counted once."""

from __future__ import annotations

import torch
from torch import nn

from plrd.core.checks import check_module


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``; a tensor reachable under several names counts once.

    Two parameters are the same when they are the same object or views of the same storage
    with the same offset and shape (e.g. ``lm_head.weight`` tied to ``embed_tokens.weight``).
    """
    check_module(model, "count_parameters")
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


def format_params(n: int) -> str:
    """A parameter count with a unit and one decimal: 134.5M, 206.4K, 1.2B, 950."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
