"""Weight layouts for decoding on the CPU: each weight stored along its longer dimension.

Decoding one token is a matrix–vector product per linear layer, y = W·x with W [out, in]: it
reads every weight once, so its speed is the rate at which the BLAS streams W. That rate
depends on W's layout as well as its size. Row-major W [out, in] is ``out`` dot products of
length ``in``; the same values stored as a contiguous [in, out] (W a transposed view of it) are
a sum of ``in`` rows of length ``out``. With oneMKL on one core (benchmarks/NOTES.md §7) the
longer contiguous run wins: a 576 → 49,152 head streams at 22 GB/s as [in, out] against 10–11
as [out, in], a factor ``up`` [1536, 128] at 17 against 7.4, while 1536 → 576 is faster as
stored. So every weight with more rows than columns is re-laid as the transpose of a
contiguous [in, out]: all of a ``LowRankLinear``'s ``up`` factors (out > rank), the wide
dense layers and the head; ``down`` factors and narrow layers stay.

This is a layout for inference only: values, shapes, names, tied weights and the state dict
are unchanged, only strides differ, and ``plrd.save`` writes such a model as usual. Training
keeps the saved layout (FSDP2 refuses non-contiguous parameters).
"""

from __future__ import annotations

from torch import nn

from plrd.core.checks import check_module
from plrd.core.layer import LowRankLinear


def _linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """Each distinct weight of an ``nn.Linear`` and each factor of a ``LowRankLinear``."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            params = [module.down, module.up]
        elif isinstance(module, nn.Linear):
            params = [module.weight]
        else:
            continue
        found.update((id(p), p) for p in params)  # a tied weight once
    return list(found.values())


def decode_layout(model: nn.Module) -> int:
    """Store each linear weight of ``model`` with more rows than columns as the transpose of a
    contiguous [columns, rows] tensor; returns how many were re-laid (0 on a second call).

    For W [out, in] with out > in: ``W.data = Wᵀ.contiguous()ᵀ`` (strides (1, out)), the same
    values and shape, so every output is unchanged up to the BLAS's order of summation. Covers
    ``nn.Linear.weight`` and ``LowRankLinear.down``/``up``; a weight tied to an embedding (a
    language model's head) is re-laid once, for both. Meant for one-token decoding on the CPU
    (see the module's docstring for what was measured); call it after loading, before
    generating.
    """
    check_module(model, "decode_layout")
    moved = 0
    for weight in _linear_weights(model):
        rows, columns = weight.shape
        if rows > columns and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()
            moved += 1
    return moved
