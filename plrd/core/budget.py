"""The parameter budget of a decomposition: where a model's parameters are, and how few of them
a decomposition of its targeted layers can reach.

A model of N parameters (``count_parameters``: tied tensors once) whose targeted layers hold
Σ W_i weights (in·out dense, r·(in + out) factored) has ``fixed`` = N − Σ W_i parameters that no
decomposition moves (embeddings, norms, biases, untargeted layers). At rank 1 a layer holds
in + out weights (or stays as it is where that is fewer), so the fewest parameters reachable
are ``fixed`` + Σ min(in + out, W_i), and ``keep`` can go no lower than that over N.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from plrd.core.counting import count_parameters
from plrd.core.kinds import is_lowrank, layer_shape
from plrd.core.ranks import LayerSpec, min_weight_params
from plrd.core.targets import Patterns, find_targets


def layer_spec(name: str, module: nn.Module, min_saving: float = 0.0) -> LayerSpec:
    """The allocation's view of a linear-like layer: widths in, out and current rank r (None =
    dense, holding in·out weights; else r·(in + out)), and ``min_saving``."""
    n_in, n_out = layer_shape(module)
    return LayerSpec(name, n_in, n_out, module.rank if is_lowrank(module) else None, min_saving)


@dataclass(frozen=True)
class Budget:
    """Where the parameters of a model are, for a decomposition of its targeted layers.

    ``total`` = N = ``count_parameters(model)``; ``specs`` = the targeted layers. Only their
    weights move: ``fixed`` = N − Σ targeted weights (embeddings, norms, biases, untargeted
    layers). The fewest parameters reachable, ``smallest``, is ``fixed`` + rank 1 in every
    targeted layer (or the layer unchanged, where that is smaller).
    """

    total: int
    specs: tuple[LayerSpec, ...]

    @classmethod
    def of(
        cls, model: nn.Module, layers: Mapping[str, nn.Module], min_saving: float = 0.0
    ) -> Budget:
        """The budget of ``model`` with ``layers`` (name → module) targeted, each factored only
        where that saves ``min_saving`` of its dense weights."""
        specs = tuple(layer_spec(name, module, min_saving) for name, module in layers.items())
        return cls(count_parameters(model), specs)

    @property
    def fixed(self) -> int:
        """Parameters no decomposition of the targeted layers moves."""
        return self.total - sum(s.weight_params for s in self.specs)

    @property
    def smallest(self) -> int:
        """The fewest parameters reachable: ``fixed`` + rank 1 everywhere it is smaller."""
        return self.fixed + min_weight_params(self.specs)

    @property
    def smallest_fraction(self) -> float:
        """smallest / total: the lowest ``keep`` that can be reached."""
        return self.smallest / self.total if self.total else 1.0


def smallest_fraction(
    model: nn.Module, targets: Patterns = None, exclude: Patterns = None
) -> float:
    """The lowest ``keep`` that ``plrd.decompose`` can reach on ``model`` with these targets.

    (N − Σ targeted weights + Σ rank-1 weights) / N, with N = ``count_parameters(model)`` and
    a rank-1 layer of widths in, out holding in + out weights. Raises InputError as
    ``find_targets`` does (no linear layer, a pattern matching nothing).
    """
    return Budget.of(model, find_targets(model, targets, exclude)).smallest_fraction
