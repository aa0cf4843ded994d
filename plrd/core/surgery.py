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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from plrd.core.budget import Budget
from plrd.core.checks import check_gram
from plrd.core.counting import count_parameters
from plrd.core.decompose_args import (
    check_arguments,
    check_layers,
    check_min_saving,
    check_output_grams,
    check_reachable,
)
from plrd.core.factorize import (
    Whitening,
    cholesky_factor,
    lowrank_spectral_factors,
    refit_up,
    spectral_factors,
)
from plrd.core.fisher import by_loss, fisher_spectrum
from plrd.core.kinds import dense_weight, is_lowrank, layer_shape, set_submodule
from plrd.core.layer import LowRankLinear
from plrd.core.ranks import global_ranks, uniform_ranks
from plrd.core.report import DecompositionReport, LayerChange
from plrd.core.targets import Patterns, find_targets

__all__ = ["decompose", "DecompositionReport", "LayerChange"]


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


@dataclass
class PlannedDecomposition:
    """What :func:`plan_decomposition` decided before any module is swapped: the targeted
    layers, the parameter budget, each layer's new rank, and the factors and whitenings
    computed on the way. :meth:`new_layers` builds the replacements from the planning Grams;
    :meth:`refit_layer` builds one from other Grams (``plrd.core.sequential``)."""

    keep: float
    method: str
    allocation: str
    layers: dict[str, nn.Module]
    budget: Budget
    target: int
    plan: _Plan
    whitenings: _Whitenings

    @property
    def changes(self) -> dict[str, int]:
        """``{layer name: new rank}`` of the layers whose rank changes."""
        return {n: r for n, r in self.plan.ranks.items() if r is not None}

    def new_layers(self, names: list[str] | None = None, progress: bool = False) -> dict:
        """``{name: LowRankLinear}`` for ``names`` (default: every changing layer)."""
        plan = self.plan
        if names is not None:
            keep = set(names)
            plan = _Plan(
                {n: r for n, r in plan.ranks.items() if n in keep}, plan.cached, plan.ridges
            )
        return _replacements(self.layers, plan, self.whitenings, progress)

    def rewhitened_layer(self, name: str, gram: Tensor) -> LowRankLinear:
        """The new layer of ``name`` at its planned rank, whitened by ``gram`` (Σ xᵀx of the
        inputs it will see) instead of the planning Gram."""
        module, rank = self.layers[name], self.changes[name]
        check_gram(gram, layer_shape(module)[0], name)
        white = Whitening(*cholesky_factor(gram.to(_weight(module).device), name))
        self.plan.cached.pop(name, None)
        _, up, down = _factors(module, rank, white, name)
        like = _weight(module)
        new = _new_layer(module, up.to(like.dtype), down.to(like.dtype), white)
        self.plan.ridges[name] = new.ridge
        return new

    def refitted_layer(
        self, name: str, gram: Tensor, cross: Tensor, damping: float
    ) -> LowRankLinear:
        """The planned layer of ``name`` with its ``up`` refitted to the uncut layer's outputs
        (``plrd.core.factorize.refit_up``; ``gram`` = Σ x_c x_cᵀ, ``cross`` = Σ x_p x_cᵀ)."""
        new = self.new_layers([name])[name]
        module = self.layers[name]
        check_gram(gram, layer_shape(module)[0], name)
        cross = cross.to(new.up.device).double()
        if is_lowrank(module):
            weight_cross = module.up.detach().double() @ (module.down.detach().double() @ cross)
        else:
            weight_cross = dense_weight(module).detach().double() @ cross
        up = refit_up(new.down.detach(), new.up.detach(), weight_cross, gram, damping)
        with torch.no_grad():
            new.up.copy_(up)
        return new

    def apply(self, model: nn.Module, progress: bool = False) -> DecompositionReport:
        """Swap every changing layer of ``model`` for its new layer (from the planning Grams)."""
        new_modules = self.new_layers(progress=progress)
        for name, new in new_modules.items():
            set_submodule(model, name, new)
        return self.report(model, new_modules)

    def report(
        self, model: nn.Module, new_modules: Mapping[str, LowRankLinear]
    ) -> DecompositionReport:
        """The report of ``model`` once ``new_modules`` are in place."""
        return DecompositionReport(
            keep=self.keep,
            method=self.method,
            allocation=self.allocation,
            params_before=self.budget.total,
            params_after=count_parameters(model),
            target_params=self.target,
            layers=_changes(self.layers, self.budget, new_modules, self.plan.ridges),
        )


def plan_decomposition(
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
) -> PlannedDecomposition:
    """Check :func:`decompose`'s arguments and choose every layer's rank; the model is not
    touched. Arguments and errors as :func:`decompose`."""
    keep = check_arguments(model, keep, grams, method, allocation)
    check_min_saving(min_saving)
    layers = find_targets(model, targets, exclude)
    check_layers(layers, grams, method)
    check_output_grams(layers, output_grams, allocation)
    budget = Budget.of(model, layers, float(min_saving))
    target = check_reachable(keep, budget)
    layer_grams = {n: grams[n] for n in layers} if method == "whiten" else dict.fromkeys(layers)
    whitenings = _Whitenings(layer_grams)
    plan = _allocate(layers, budget, target, allocation, whitenings, output_grams, progress)
    return PlannedDecomposition(
        keep, method, allocation, dict(layers), budget, target, plan, whitenings
    )


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
    planned = plan_decomposition(
        model, keep, targets, exclude, grams, allocation, method, progress, output_grams, min_saving
    )
    return planned.apply(model, progress)
