"""Model surgery: ``plrd.decompose`` replaces targeted linear layers by low-rank ones, in place.

Budget: the model keeps ``keep × count_parameters(model)`` parameters. Only the weights of the
targeted layers move; everything else (embeddings, norms, biases, untargeted layers) is fixed, so
the targeted weights get ``keep·N − fixed``. Ranks come from ``plrd.core.ranks`` (uniform or global
allocation); a dense layer (``nn.Linear`` or HF ``Conv1D``) is factored with
``LowRankLinear.from_linear``, an already-factored one is truncated with
``LowRankLinear.truncate`` (QR core, no dense SVD). A layer whose rank would reach its
break-even ⌊in·out/(in+out)⌋ (or its current rank) is left as it is.

All checks and all new layers are computed before the first module is swapped, so a failure
leaves the model untouched.

Work is not repeated within one call: layers sharing a Gram (q/k/v, gate/up: ``collect_grams``
returns one tensor for them) share one Cholesky factor, and global allocation takes each layer's
spectrum and factors from one SVD (the factors up to the largest useful rank are kept, in the
layer's dtype, until the ranks are known: at most the size of the targeted weights).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from plrd.core.budget import Budget
from plrd.core.checks import check_finite, check_gram, check_weight
from plrd.core.counting import count_parameters
from plrd.core.factorize import (
    Whitening,
    cholesky_factor,
    lowrank_spectral_factors,
    spectral_factors,
)
from plrd.core.fisher import by_loss, fisher_spectrum
from plrd.core.kinds import dense_weight, is_lowrank, layer_shape, set_submodule
from plrd.core.layer import LowRankLinear
from plrd.core.ranks import global_ranks, uniform_ranks
from plrd.core.report import DecompositionReport, LayerChange
from plrd.core.targets import Patterns, find_targets
from plrd.errors import InputError

METHODS = ("whiten", "svd")
ALLOCATIONS = ("uniform", "global", "fisher")

__all__ = ["decompose", "DecompositionReport", "LayerChange"]


# --- checks -----------------------------------------------------------------------------------


def _check_keep(keep: float) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise InputError(f"keep must be a number in (0, 1], got {keep!r}")
    keep = float(keep)
    if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InputError(
            f"keep={keep!r} is outside (0, 1]; pass the fraction of the model's current "
            f"parameters to keep, e.g. keep=0.8"
        )
    return keep


def _check_arguments(
    model: nn.Module, keep: float, grams: object, method: str, allocation: str
) -> float:
    """Check decompose's arguments other than the layers; return ``keep`` as a float."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"decompose needs a torch.nn.Module as model, got {type(model).__name__}; pass the "
            "model object itself"
        )
    if grams is not None and not isinstance(grams, Mapping):
        raise InputError(
            f"grams must map layer names to Gram matrices (plrd.collect_grams output), got "
            f"{type(grams).__name__}; pass grams=plrd.collect_grams(model, batches)"
        )
    keep = _check_keep(keep)
    if method not in METHODS:
        raise InputError(f"method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise InputError(
            f"allocation={allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}"
        )
    return keep


def _check_min_saving(min_saving: float) -> None:
    if (
        isinstance(min_saving, bool)
        or not isinstance(min_saving, numbers.Real)
        or not 0.0 <= float(min_saving) < 1.0
    ):
        raise InputError(
            f"min_saving must be a fraction in [0, 1), got {min_saving!r}; 0 factors a layer "
            "wherever that saves a parameter, 0.2 only where it saves a fifth of its weights"
        )


def _check_grams_present(layers: Mapping[str, nn.Module], grams: Mapping | None) -> None:
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


def _check_layers(
    layers: Mapping[str, nn.Module], grams: Mapping[str, Tensor] | None, method: str
) -> None:
    """Weights finite and materialised; for ``whiten``, a well-formed Gram per layer (a Gram
    shared by several layers is checked once)."""
    if method == "whiten":
        _check_grams_present(layers, grams)
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


def _check_output_grams(
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


def _check_reachable(keep: float, budget: Budget) -> int:
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


# --- factors ----------------------------------------------------------------------------------


class _Whitenings:
    """Cholesky factors of the (already checked) Grams, one per Gram tensor and device."""

    def __init__(self, grams: Mapping[str, Tensor | None]) -> None:
        self.grams = grams
        self.cache: dict[tuple[int, str], Whitening] = {}

    def get(self, name: str, module: nn.Module) -> Whitening | None:
        gram = self.grams[name]
        if gram is None:
            return None
        device = _weight(module).device
        key = (id(gram), str(device))  # self.grams keeps every Gram alive: ids stay unique
        if key not in self.cache:
            self.cache[key] = Whitening(*cholesky_factor(gram.to(device), name))
        return self.cache[key]


def _weight(module: nn.Module) -> Tensor:
    """A parameter giving the layer's dtype, device and requires_grad."""
    return module.up if is_lowrank(module) else dense_weight(module)


def _factors(
    module: nn.Module, keep: int, white: Whitening | None, name: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(σ, up [out, keep], down [keep, in]) of the layer's (whitened) weight, float64."""
    if is_lowrank(module):
        return lowrank_spectral_factors(module.up.detach(), module.down.detach(), keep, white, name)
    return spectral_factors(dense_weight(module).detach(), keep, white, name)


@dataclass
class _Plan:
    """The allocation's outcome: rank per layer (None = unchanged), the factors computed on
    the way (name → (up [out, k], down [k, in]) in the layer's dtype, k ≥ its new rank), and
    the relative ridge of every layer whose Gram was factored."""

    ranks: dict[str, int | None]
    cached: dict[str, tuple[Tensor, Tensor]]
    ridges: dict[str, float]


def _allocate(
    layers: Mapping[str, nn.Module],
    budget: Budget,
    target: int,
    allocation: str,
    whitenings: _Whitenings,
    output_grams: Mapping[str, Tensor] | None,
    progress: bool,
) -> _Plan:
    """Ranks bringing the model to ``target`` parameters (targeted weights to target − fixed).

    ``uniform`` needs shapes only. ``global`` needs every layer's (whitened) spectrum, and
    ``fisher`` that spectrum in loss units (``plrd.core.fisher.fisher_spectrum``): one SVD per
    layer gives it together with the top factors up to the largest useful rank (threshold − 1),
    which are kept for the layers that change, so no layer is factored twice.
    """
    weights = target - budget.fixed
    if allocation == "uniform":
        return _Plan(uniform_ranks(budget.specs, weights), {}, {})
    spectra, cached, ridges = {}, {}, {}
    for spec in tqdm(budget.specs, desc="spectra", unit="layer", disable=not progress):
        module = layers[spec.name]
        white = whitenings.get(spec.name, module)
        useful = max(spec.threshold - 1, 0)  # a rank at or above the threshold changes nothing
        keep = spec.max_rank if allocation == "fisher" else useful  # fisher scores them all
        sigma, up, down = _factors(module, keep, white, spec.name)
        if allocation == "fisher":
            sigma, up, down = by_loss(fisher_spectrum(sigma, up, output_grams[spec.name]), up, down)
        spectra[spec.name] = sigma
        ridges[spec.name] = 0.0 if white is None else white.ridge
        like = _weight(module)
        cached[spec.name] = (up[:, :useful].to(like.dtype), down[:useful].to(like.dtype))
    ranks = global_ranks(budget.specs, spectra, weights)
    cached = {n: f for n, f in cached.items() if ranks[n] is not None}
    return _Plan(ranks, cached, ridges)


def _new_layer(
    module: nn.Module, up: Tensor, down: Tensor, white: Whitening | None
) -> LowRankLinear:
    like = _weight(module)
    new = LowRankLinear._from_factors(
        up, down, getattr(module, "bias", None), like, 0.0 if white is None else white.ridge
    )
    new.train(module.training)
    return new


def _replacements(
    layers: Mapping[str, nn.Module], plan: _Plan, whitenings: _Whitenings, progress: bool
) -> dict[str, LowRankLinear]:
    """The new layer of every layer whose rank changes (the model is not touched yet).

    A layer whose factors the allocation kept takes their first ``rank`` columns/rows
    (contiguous copies, so the cache is freed); the others are factored at their rank.
    """
    changes = {n: r for n, r in plan.ranks.items() if r is not None}
    new_modules: dict[str, LowRankLinear] = {}
    for name in tqdm(changes, desc="factoring", unit="layer", disable=not progress):
        module, rank = layers[name], changes[name]
        white = whitenings.get(name, module)
        if name in plan.cached:
            up, down = plan.cached.pop(name)
            up = up[:, :rank].clone(memory_format=torch.contiguous_format)
            down = down[:rank].clone(memory_format=torch.contiguous_format)
        else:
            _, up, down = _factors(module, rank, white, name)
        new_modules[name] = _new_layer(module, up, down, white)
        plan.ridges[name] = new_modules[name].ridge
    return new_modules


# --- report -----------------------------------------------------------------------------------


def _bias_params(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel()


def _changes(
    layers: Mapping[str, nn.Module],
    budget: Budget,
    new_modules: Mapping[str, LowRankLinear],
    ridges: Mapping[str, float],
) -> list[LayerChange]:
    """One report row per targeted layer: ranks and parameters (bias included) before/after."""
    rows = []
    for spec in budget.specs:
        bias = _bias_params(layers[spec.name])
        new = new_modules.get(spec.name)
        rows.append(
            LayerChange(
                name=spec.name,
                in_features=spec.in_features,
                out_features=spec.out_features,
                rank_before=spec.rank,
                rank_after=spec.rank if new is None else new.rank,
                params_before=spec.weight_params + bias,
                params_after=(spec.weight_params if new is None else new.rank * spec.step) + bias,
                ridge=ridges.get(spec.name, 0.0),
            )
        )
    return rows


# --- decompose --------------------------------------------------------------------------------


def decompose(
    model: nn.Module,
    keep: float,
    targets: Patterns = None,
    exclude: Patterns = None,
    grams: Mapping[str, Tensor] | None = None,
    allocation: str = "uniform",
    method: str = "whiten",
    progress: bool = True,
    output_grams: Mapping[str, Tensor] | None = None,
    min_saving: float = 0.0,
) -> DecompositionReport:
    """Shrink ``model`` in place to ≈ ``keep`` × its current parameter count.

    Args:
        model: any ``nn.Module``; dense (``nn.Linear``, HF ``Conv1D``) and already-factored
            (``LowRankLinear``) layers are both handled, so this can be applied repeatedly.
        keep: fraction in (0, 1] of ``plrd.count_parameters(model)`` to keep.
        targets, exclude: layer-name patterns (see ``plrd.core.targets``); default: every linear
            layer except output heads and layers tied to embeddings.
        grams: ``plrd.collect_grams(model, ...)`` output; required by ``method="whiten"``.
        allocation: ``"uniform"`` (same kept fraction per layer), ``"global"`` (drop the
            components with least whitened output error per parameter across layers), or
            ``"fisher"`` (drop the components that raise the loss least per parameter: the
            output error weighted by ``output_grams``; needs them).
        method: ``"whiten"`` (SVD of W·L, G = L Lᵀ: minimises output error on the calibration
            inputs) or ``"svd"`` (plain SVD; ``grams`` ignored).
        progress: show a progress bar over the layers being factored.
        output_grams: ``plrd.collect_output_grams(model, ...)`` output (Σ g gᵀ of the
            gradients at each layer's output); required by ``allocation="fisher"``.
        min_saving: in [0, 1): a layer is factored only at ranks whose factors hold at most
            1 − ``min_saving`` of its dense weights (0: below break-even). Near break-even two
            skinny products save parameters but little time; a positive value leaves those
            layers dense and cuts the others deeper.

    Returns a :class:`DecompositionReport` (``print(report)`` shows a table). Raises
    ``InputError`` (a ``ValueError``) for a ``keep`` outside (0, 1] or below
    ``plrd.core.budget.smallest_fraction``, unknown method/allocation, missing or malformed
    Gram matrices, or non-finite weights (naming the layer); the model is unchanged when it
    raises.
    """
    keep = _check_arguments(model, keep, grams, method, allocation)
    _check_min_saving(min_saving)
    layers = find_targets(model, targets, exclude)
    _check_layers(layers, grams, method)
    _check_output_grams(layers, output_grams, allocation)
    budget = Budget.of(model, layers, float(min_saving))
    target = _check_reachable(keep, budget)

    layer_grams = {n: grams[n] for n in layers} if method == "whiten" else dict.fromkeys(layers)
    whitenings = _Whitenings(layer_grams)
    plan = _allocate(layers, budget, target, allocation, whitenings, output_grams, progress)
    new_modules = _replacements(layers, plan, whitenings, progress)
    rows = _changes(layers, budget, new_modules, plan.ridges)
    for name, new in new_modules.items():
        set_submodule(model, name, new)
    return DecompositionReport(
        keep=keep,
        method=method,
        allocation=allocation,
        params_before=budget.total,
        params_after=count_parameters(model),
        target_params=target,
        layers=rows,
    )
