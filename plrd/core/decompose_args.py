"""Checks of ``plrd.decompose``'s arguments, all made before any work or any change to the model:
the fraction to keep, the method and allocation, the layers' weights and Gram matrices."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from torch import Tensor, nn

from plrd.core.budget import Budget
from plrd.core.checks import check_finite, check_gram, check_module, check_weight
from plrd.core.kinds import dense_weight, is_lowrank, layer_shape
from plrd.errors import InputError

METHODS = ("whiten", "svd")
ALLOCATIONS = ("uniform", "global", "fisher")


def check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise InputError(f"keep must be a number in (0, 1], got {keep!r}")
    keep = float(keep)
    if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InputError(
            f"keep={keep!r} is outside (0, 1]; pass the fraction of the model's current "
            f"parameters to keep, e.g. keep=0.8"
        )
    return keep


def check_arguments(
    model: nn.Module, keep: float, grams: object, method: str, allocation: str
) -> float:
    """Check decompose's arguments other than the layers; return ``keep`` as a float."""
    check_module(model, "decompose")
    if grams is not None and not isinstance(grams, Mapping):
        raise InputError(
            f"grams must map layer names to Gram matrices (plrd.collect_grams output), got "
            f"{type(grams).__name__}; pass grams=plrd.collect_grams(model, batches)"
        )
    keep = check_keep(keep)
    if method not in METHODS:
        raise InputError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise InputError(
            f"allocation={allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}"
        )
    return keep


def check_min_saving(min_saving: float) -> None:
    if (
        isinstance(min_saving, bool)
        or not isinstance(min_saving, numbers.Real)
        or not 0.0 <= float(min_saving) < 1.0
    ):
        raise InputError(
            f"min_saving must be a fraction in [0, 1), got {min_saving!r}; 0 factors a layer "
            "wherever that saves a parameter, 0.2 only where it saves a fifth of its weights"
        )


def check_grams_present(layers: Mapping[str, nn.Module], grams: Mapping | None) -> None:
    if grams is None:
        raise InputError(
            "method='whiten' needs the layers' input Gram matrices: call "
            "grams = plrd.collect_grams(model, batches) first and pass grams=grams, "
            "or use method='svd' (plain SVD, usually much worse for LLMs)"
        )
    missing = [n for n in layers if n not in grams]
    if missing:
        raise InputError(
            f"no Gram matrix for {len(missing)} targeted layer(s), e.g. {missing[0]!r}; "
            "collect the grams with the same targets/exclude as decompose "
            "(plrd.collect_grams(model, batches, targets=..., exclude=...))"
        )


def check_layers(
    layers: Mapping[str, nn.Module], grams: Mapping[str, Tensor] | None, method: str
) -> None:
    """Weights finite and materialised; for ``whiten``, a well-formed Gram per layer (a Gram
    shared by several layers is checked once)."""
    if method == "whiten":
        check_grams_present(layers, grams)
    checked: set[tuple[int, int]] = set()
    for name, module in layers.items():
        if is_lowrank(module):
            check_weight(module.up.detach(), "up", name)
            check_weight(module.down.detach(), "down", name)
        else:
            check_weight(dense_weight(module).detach(), "weight", name)
        bias = getattr(module, "bias", None)
        if bias is not None:
            check_finite(bias.detach(), "bias", name)
        if method == "whiten":
            gram, n_in = grams[name], layer_shape(module)[0]
            if (id(gram), n_in) not in checked:
                check_gram(gram, n_in, name)
                checked.add((id(gram), n_in))


def check_output_grams(
    layers: Mapping[str, nn.Module], output_grams: Mapping | None, allocation: str
) -> None:
    if allocation != "fisher":
        return
    if output_grams is None:
        raise InputError(
            "allocation='fisher' needs output_grams: pass "
            "output_grams=plrd.collect_output_grams(model, batches)"
        )
    for name, module in layers.items():
        gram = output_grams.get(name)
        out = layer_shape(module)[1]
        if not isinstance(gram, Tensor) or tuple(gram.shape) != (out, out):
            shape = tuple(gram.shape) if isinstance(gram, Tensor) else gram
            raise InputError(
                f"layer {name!r}: output_grams needs a [{out}, {out}] Gram, got {shape}; "
                "collect them on this model with plrd.collect_output_grams"
            )
        check_finite(gram, "output Gram", name)


def check_reachable(keep: float, budget: Budget) -> int:
    """``round(keep·N)``, the target parameter count; InputError when it is below reach."""
    target = round(keep * budget.total)
    if target < budget.smallest:
        raise InputError(
            f"keep={keep:g} is unreachable: {budget.total:,} parameters now, target "
            f"{target:,}, but with rank 1 in all {len(budget.specs)} targeted layers the model "
            f"still has {budget.smallest:,} (the untargeted parameters alone are "
            f"{budget.fixed:,}); the smallest reachable keep is "
            f"{budget.smallest_fraction:.4f}: raise keep or target more layers"
        )
    return target
