"""Layer kinds: which modules plrd treats as linear, their shapes, and swapping a submodule.

Three layer kinds are "linear" here, all computing ``y = x Wᵀ + b`` with W of shape [out, in]:

- ``torch.nn.Linear`` (weight [out, in]);
- Hugging Face ``Conv1D`` (GPT-2 family; weight stored transposed, [in, out]), recognised by
  class name so that transformers is never imported here;
- ``plrd.LowRankLinear`` (W = up @ down, already factored), recognised by its marker base
  class ``Factored`` so that this module does not import the layer (which imports this one).
"""

from __future__ import annotations

import torch
from torch import nn

from plrd.errors import InputError


class Factored:
    """Marker base class of factored layers (``plrd.LowRankLinear``): W = up [out, r] @ down
    [r, in], with attributes ``in_features``, ``out_features``, ``rank``, ``up``, ``down`` and
    ``bias``."""


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face ``Conv1D`` (weight [in, out], ``y = x W + b``)."""
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


def is_lowrank(module: nn.Module) -> bool:
    """True for ``plrd.LowRankLinear`` (W = up [out, r] @ down [r, in])."""
    return isinstance(module, Factored)


def is_dense(module: nn.Module) -> bool:
    """True for a dense linear layer: ``nn.Linear`` or HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_linear_like(module: nn.Module) -> bool:
    """True for any layer plrd can decompose (dense or already factored)."""
    return is_dense(module) or is_lowrank(module)


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return int(module.in_features), int(module.out_features)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a dense layer (a transposed view for ``Conv1D``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same map as a dense layer, sharing its tensors.

    ``nn.Linear`` is returned unchanged; a ``Conv1D`` (weight [in, out]) becomes a Linear whose
    weight is the transposed view [out, in] of the same storage (nothing is copied).
    """
    if isinstance(module, nn.Linear):
        return module
    if not is_conv1d(module):
        raise InputError(
            f"expected a dense nn.Linear or Hugging Face Conv1D layer, got "
            f"{type(module).__name__}; only dense layers have an nn.Linear form"
        )
    n_in, n_out = layer_shape(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(n_in, n_out, bias=bias is not None, device="meta")
    weight = module.weight
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
