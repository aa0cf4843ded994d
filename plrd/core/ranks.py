"""Rank allocation: choose one rank per targeted layer so the weights fit a parameter budget.

Pure functions on layer shapes and spectra; no modules touched.

A layer with input width ``in`` and output width ``out`` costs ``r·(in+out)`` weights at rank r
and ``in·out`` dense. It is only factored (or, if already factored, truncated) below its
*threshold* ``t = min(current max rank, ⌊(1 − s)·in·out/(in+out)⌋)``: a chosen rank ``r ≥ t``
leaves the layer as it is (dense stays dense, a factored layer keeps its rank). ``s`` is the
layer's ``min_saving``: 0 factors wherever that saves a weight (t is the break-even rank); s > 0
factors only where it saves at least that fraction of the dense weights, since near break-even
two skinny products run no faster than one dense one. Ranks are at least 1.

- Uniform: every layer keeps the same fraction f of its current weights, r = round(f·P/(in+out)).
  f is found by bisection (the total is monotone in f, break-even jumps included), then single
  rank steps move the total to the nearest reachable value.
- Global: every singular component j of every layer has a cost σ_j²/(in+out): the (whitened)
  output error it adds per weight it saves. Components are dropped cheapest first, smallest σ of
  each layer first, until the budget is met. In a dense layer the drops above the threshold free
  nothing until the one that crosses it, so they are priced together with it (``_layer_cuts``):
  a layer is not cut to just below break-even, paying for every component above, to free a few
  weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plrd.core.factorize import break_even_rank
from plrd.errors import InputError


def saving_rank(in_features: int, out_features: int, min_saving: float = 0.0) -> int:
    """⌊(1 − min_saving)·in·out/(in + out)⌋: below this rank the factors hold at most
    1 − ``min_saving`` of the dense weights (``min_saving`` = 0: the break-even rank)."""
    if min_saving == 0.0:
        return break_even_rank(in_features, out_features)
    return math.floor(
        (1.0 - min_saving) * in_features * out_features / (in_features + out_features)
    )


@dataclass(frozen=True)
class LayerSpec:
    """A targeted layer: widths, current rank (``None`` = dense) and the least fraction of its
    dense weights a factorization must save (``min_saving``, see the module docstring)."""

    name: str
    in_features: int
    out_features: int
    rank: int | None = None
    min_saving: float = 0.0

    @property
    def step(self) -> int:
        """Weights per rank: in + out."""
        return self.in_features + self.out_features

    @property
    def max_rank(self) -> int:
        """min(in, out) for a dense layer, the current rank for a factored one."""
        return min(self.in_features, self.out_features) if self.rank is None else self.rank

    @property
    def threshold(self) -> int:
        """Smallest rank at which the layer is left unchanged: min(max rank, the largest rank
        that still saves ``min_saving`` of the dense weights)."""
        return min(self.max_rank, saving_rank(self.in_features, self.out_features, self.min_saving))

    @property
    def weight_params(self) -> int:
        """Current weights: in·out dense, r·(in+out) factored (bias not included)."""
        if self.rank is None:
            return self.in_features * self.out_features
        return self.rank * self.step

    def params_at(self, rank: int) -> int:
        """Weights after choosing ``rank`` (unchanged layer at or above the threshold)."""
        return self.weight_params if rank >= self.threshold else rank * self.step

    def resolve(self, rank: int) -> int | None:
        """The rank to apply, or ``None`` when the layer stays as it is."""
        return None if rank >= self.threshold else rank


def min_weight_params(specs: Sequence[LayerSpec]) -> int:
    """Fewest weights reachable: rank 1 in every layer (or unchanged where that is smaller)."""
    return sum(s.params_at(1) for s in specs)


def _uniform_rank(spec: LayerSpec, fraction: float) -> int:
    rank = round(fraction * spec.weight_params / spec.step)
    return max(1, min(rank, spec.max_rank))


def _total(specs: Sequence[LayerSpec], ranks: Sequence[int]) -> int:
    return sum(s.params_at(r) for s, r in zip(specs, ranks, strict=True))


def uniform_ranks(specs: Sequence[LayerSpec], budget: int) -> dict[str, int | None]:
    """Ranks keeping the same fraction of every layer's weights, total ≈ ``budget``.

    Returns name → new rank, or ``None`` for a layer left unchanged. The total lands at the
    reachable value nearest ``budget`` by single rank steps (within half the widest layer's
    in+out of it, except where break-even jumps prevent that).
    """
    if budget >= sum(s.weight_params for s in specs):
        return {s.name: None for s in specs}
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _total(specs, [_uniform_rank(s, mid) for s in specs]) <= budget:
            lo = mid
        else:
            hi = mid
    ranks = [_uniform_rank(s, lo) for s in specs]
    ranks = _fix_up(specs, ranks, budget)
    return {s.name: s.resolve(r) for s, r in zip(specs, ranks, strict=True)}


def _fix_up(specs: Sequence[LayerSpec], ranks: list[int], budget: int) -> list[int]:
    """Single rank steps while they bring the total closer to ``budget``.

    A step up from ``threshold − 1`` restores the layer unchanged; a step down from unchanged
    goes to ``threshold − 1``. Raises the layer keeping the smallest fraction of its weights
    (or lowers the one keeping the largest), so the fractions stay as even as steps allow.
    """
    ranks = [min(r, s.threshold) for s, r in zip(specs, ranks, strict=True)]
    deficit = budget - _total(specs, ranks)
    while deficit != 0:
        best, best_key, best_delta = None, None, 0
        for i, (s, r) in enumerate(zip(specs, ranks, strict=True)):
            target = r + 1 if deficit > 0 else min(r, s.threshold) - 1
            if not 1 <= target <= s.threshold:
                continue
            delta = s.params_at(target) - s.params_at(r)
            if delta == 0 or abs(deficit - delta) >= abs(deficit):
                continue
            fraction = s.params_at(r) / s.weight_params
            key = fraction if deficit > 0 else -fraction
            if best_key is None or key < best_key:
                best, best_key, best_delta = i, key, delta
        if best is None:
            break
        ranks[best] += 1 if deficit > 0 else -1
        deficit -= best_delta
    return ranks


@dataclass(frozen=True)
class _Cut:
    """Consecutive components of one layer (``owner``, an index into the specs), dropped
    smallest σ first: ``count`` of them, adding ``cost`` = Σσ² of (whitened) output error and
    freeing ``saving`` weights."""

    owner: int
    count: int
    cost: float
    saving: int

    def costlier_than(self, other: _Cut) -> bool:
        """cost/saving ≥ other's (a cut freeing nothing is infinitely costly)."""
        return self.cost * other.saving >= other.cost * self.saving


def _layer_cuts(owner: int, spec: LayerSpec, sigma: np.ndarray) -> list[_Cut]:
    """Layer ``owner``'s components m−1 … 1 (never σ_0), smallest σ first, grouped so that
    each group costs strictly more per weight freed than the one before.

    Dropping σ_j adds σ_j² of error and frees ``params_at(j + 1) − params_at(j)`` weights:
    in+out below the threshold, but nothing above it in a dense layer, until the drop that
    crosses it frees the rest. A drop that frees nothing is never worth taking alone, so it
    is grouped with the ones after it, and any group costlier per weight than the next is
    merged with it (the lower convex hull of error against weights freed): then a layer is
    cut below break-even only when all it pays for that is worth the weights it frees.
    """
    cuts: list[_Cut] = []
    for j in range(spec.max_rank - 1, 0, -1):  # rank j + 1 → j
        cut = _Cut(owner, 1, float(sigma[j]) ** 2, spec.params_at(j + 1) - spec.params_at(j))
        while cuts and cuts[-1].costlier_than(cut):
            earlier = cuts.pop()
            cut = _Cut(
                owner,
                earlier.count + cut.count,
                earlier.cost + cut.cost,
                earlier.saving + cut.saving,
            )
        cuts.append(cut)
    return [c for c in cuts if c.saving > 0]


def _drop_order(specs: Sequence[LayerSpec], spectra: Mapping[str, torch.Tensor]) -> list[_Cut]:
    """Every layer's cuts (``_layer_cuts``), cheapest per weight freed first; within a layer
    the groups keep their order, since each costs more per weight than the one before."""
    cuts = []
    for i, s in enumerate(specs):
        sigma = spectra[s.name].detach().double().cpu().numpy()
        if sigma.shape[0] < s.max_rank:
            raise InputError(
                f"layer {s.name!r}: {sigma.shape[0]} singular values given, {s.max_rank} needed; "
                "pass the whole spectrum of the layer's (whitened) weight"
            )
        cuts += _layer_cuts(i, s, np.sort(np.abs(sigma[: s.max_rank]))[::-1])
    ratios = np.array([c.cost / c.saving for c in cuts], dtype=np.float64)
    return [cuts[k] for k in np.argsort(ratios, kind="stable")]


def global_ranks(
    specs: Sequence[LayerSpec], spectra: Mapping[str, torch.Tensor], budget: int
) -> dict[str, int | None]:
    """Ranks dropping the components of least output error per weight across all layers.

    ``spectra[name]`` holds the layer's singular values (whitened ones for output error), at
    least ``max_rank`` of them. Component j of a layer costs σ_j²/(in+out); components are
    dropped cheapest first (never a layer's first; those that free nothing until the threshold
    is crossed priced together with the drops that do, see ``_layer_cuts``) until the total is
    ≤ ``budget``; the last drop is undone if that lands nearer. Returns name → new rank, or
    ``None`` for unchanged.
    """
    if budget >= sum(s.weight_params for s in specs):
        return {s.name: None for s in specs}
    ranks = [s.max_rank for s in specs]
    total = previous = _total(specs, ranks)
    last = None
    for cut in _drop_order(specs, spectra):
        i, s = cut.owner, specs[cut.owner]
        for _ in range(cut.count):
            if total <= budget:
                break
            before = s.params_at(ranks[i])
            ranks[i] -= 1
            previous, total = total, total - before + s.params_at(ranks[i])
            last = i
        if total <= budget:
            break
    if last is not None and abs(budget - previous) < abs(budget - total):
        ranks[last] += 1
    return {s.name: s.resolve(r) for s, r in zip(specs, ranks, strict=True)}
