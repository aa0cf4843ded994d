"""Rank allocation on layer shapes and spectra (no models)."""

import pytest
import torch

from plrd.core.ranks import LayerSpec, global_ranks, min_weight_params, uniform_ranks
from plrd.errors import InputError


def _specs():
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 172), (64, 172), (172, 64)] * 3
    return [LayerSpec(f"l{i}", n_in, n_out) for i, (n_in, n_out) in enumerate(shapes)]


def _total(specs, ranks):
    return sum(s.params_at(s.threshold if ranks[s.name] is None else ranks[s.name]) for s in specs)


def test_spec_threshold_and_params():
    dense = LayerSpec("a", 64, 192)
    assert dense.threshold == 48 and dense.step == 256
    assert dense.params_at(47) == 47 * 256 and dense.params_at(48) == 64 * 192
    assert dense.resolve(48) is None and dense.resolve(10) == 10
    factored = LayerSpec("b", 64, 192, rank=20)
    assert factored.threshold == 20 and factored.weight_params == 20 * 256
    assert factored.params_at(30) == factored.weight_params and factored.resolve(19) == 19
    high = LayerSpec("c", 64, 64, rank=40)  # factored above break-even (32)
    assert high.threshold == 32 and high.resolve(35) is None and high.resolve(31) == 31


@pytest.mark.parametrize("fraction", [0.9, 0.6, 0.3, 0.1])
def test_uniform_lands_within_one_step_and_keeps_fractions_even(fraction):
    specs = _specs()
    total = sum(s.weight_params for s in specs)
    budget = int(fraction * total)
    ranks = uniform_ranks(specs, budget)
    assert abs(_total(specs, ranks) - budget) <= max(s.step for s in specs)
    kept = [
        (s.weight_params if ranks[s.name] is None else ranks[s.name] * s.step) / s.weight_params
        for s in specs
    ]
    assert max(kept) - min(kept) < 0.1


def test_uniform_near_full_budget_keeps_layers_dense_at_break_even():
    specs = _specs()
    total = sum(s.weight_params for s in specs)
    ranks = uniform_ranks(specs, total - 300)
    assert any(r is None for r in ranks.values())
    assert abs(_total(specs, ranks) - (total - 300)) <= max(s.step for s in specs)
    assert all(r is None for r in uniform_ranks(specs, total).values())


def test_uniform_on_factored_layers_only_lowers_ranks():
    specs = [LayerSpec("a", 64, 64, rank=20), LayerSpec("b", 128, 64, rank=30)]
    ranks = uniform_ranks(specs, int(0.5 * sum(s.weight_params for s in specs)))
    assert ranks["a"] in (9, 10, 11) and ranks["b"] in (14, 15, 16)
    assert all(r is None for r in uniform_ranks(specs, 10**9).values())


def test_min_weight_params_is_rank_one_everywhere():
    specs = _specs()
    assert min_weight_params(specs) == sum(s.step for s in specs)
    ranks = uniform_ranks(specs, min_weight_params(specs))
    assert set(ranks.values()) == {1}


def test_global_drops_cheapest_components_first():
    # 32x32 layers: 1024 weights dense, 64 per rank, break-even 16
    specs = [LayerSpec("loud", 32, 32), LayerSpec("quiet", 32, 32)]
    spectra = {"loud": torch.linspace(10, 5, 32), "quiet": torch.linspace(1, 0.5, 32)}
    ranks = global_ranks(specs, spectra, budget=1024)
    # every quiet component is cheaper than any loud one: quiet goes to rank 1 first (64
    # weights), then loud must fall below break-even: rank 15 (960 weights)
    assert ranks == {"quiet": 1, "loud": 15}


def test_global_uses_error_per_parameter():
    # equal σ, but a "wide" component frees 288 weights and a "narrow" one 64: wide goes first
    specs = [LayerSpec("wide", 256, 32), LayerSpec("narrow", 32, 32)]
    spectra = {"wide": torch.ones(32), "narrow": torch.ones(32)}
    ranks = global_ranks(specs, spectra, budget=1024 + 10 * 288)
    assert ranks == {"wide": 10, "narrow": None}


def _dropped_error(specs, spectra, ranks):
    """Σ σ_j² over the components a choice of ranks drops (the whitened output error)."""
    error = 0.0
    for s in specs:
        kept = s.max_rank if ranks[s.name] is None else ranks[s.name]
        error += float((spectra[s.name][kept:] ** 2).sum())
    return error


def test_global_scores_error_per_parameter_not_error_alone():
    # wide (256x32): σ = 2, each component frees 288 weights, cost 4/288 ≈ 0.014 per weight
    # narrow (32x32): σ = 1, each component frees 64 weights, cost 1/64 ≈ 0.016 per weight
    # σ² alone would drop narrow's (1 < 4) first: narrow to rank 1, then 19 of wide's, error
    # 31·1 + 19·4 = 107; per weight, 22 of wide's components meet the budget for 88.
    specs = [LayerSpec("wide", 256, 32), LayerSpec("narrow", 32, 32)]
    spectra = {"wide": torch.full((32,), 2.0), "narrow": torch.ones(32)}
    budget = 1024 + 10 * 288
    ranks = global_ranks(specs, spectra, budget)
    assert ranks == {"wide": 10, "narrow": None}
    assert _total(specs, ranks) == budget
    by_sigma_alone = {"wide": 13, "narrow": 1}
    assert _total(specs, by_sigma_alone) <= budget
    assert _dropped_error(specs, spectra, ranks) == 88.0
    assert _dropped_error(specs, spectra, by_sigma_alone) == 107.0


def test_global_budget_monotone_and_within_a_step():
    torch.manual_seed(0)
    specs = _specs()
    spectra = {
        s.name: torch.rand(min(s.in_features, s.out_features)).sort(descending=True).values
        for s in specs
    }
    total = sum(s.weight_params for s in specs)
    previous = None
    for fraction in (0.2, 0.4, 0.6, 0.8):
        budget = int(fraction * total)
        ranks = global_ranks(specs, spectra, budget)
        assert abs(_total(specs, ranks) - budget) <= 2 * max(s.step for s in specs)
        effective = {s.name: s.threshold if ranks[s.name] is None else ranks[s.name] for s in specs}
        if previous is not None:
            assert all(effective[n] >= previous[n] for n in effective)
        previous = effective


def test_global_needs_enough_singular_values():
    with pytest.raises(InputError, match="singular values"):
        global_ranks([LayerSpec("a", 16, 16)], {"a": torch.ones(3)}, budget=10)


def test_min_saving_lowers_the_threshold_to_the_rank_that_saves_that_fraction():
    plain = LayerSpec("mlp", 576, 1536)
    capped = LayerSpec("mlp", 576, 1536, min_saving=0.2)
    assert plain.threshold == 418  # ⌊576·1536 / 2112⌋, the break-even rank
    assert capped.threshold == 335  # ⌊0.8 · 576·1536 / 2112⌋
    assert capped.params_at(334) == 334 * 2112 <= 0.8 * 576 * 1536
    assert capped.params_at(335) == 576 * 1536  # would save less than a fifth: stays dense
    # the cap never raises the threshold of a factored layer above its current rank
    assert LayerSpec("mlp", 576, 1536, rank=100, min_saving=0.2).threshold == 100


@pytest.mark.parametrize("allocate", ["uniform", "global"])
def test_min_saving_leaves_no_layer_factored_near_break_even(allocate):
    specs = [LayerSpec(f"l{i}", 64, 192 if i % 2 else 64, min_saving=0.3) for i in range(6)]
    budget = int(0.8 * sum(s.weight_params for s in specs))
    if allocate == "uniform":
        ranks = uniform_ranks(specs, budget)
    else:
        spectra = {
            s.name: torch.linspace(3.0, 0.1, s.max_rank) * (1 + i) for i, s in enumerate(specs)
        }
        ranks = global_ranks(specs, spectra, budget)
    factored = [(s, r) for s, r in zip(specs, ranks.values(), strict=True) if r is not None]
    assert factored, ranks
    for spec, rank in factored:
        assert rank * spec.step <= 0.7 * spec.weight_params, (spec, rank)
    total = sum(s.params_at(ranks[s.name] or s.threshold) for s in specs)
    assert abs(total - budget) <= max(s.step for s in specs) or total <= budget


def test_global_prices_the_drops_above_break_even_with_the_one_that_crosses_it():
    # dense 32x32 (break-even 16): dropping to rank 15 takes 17 components (0.81 each) to free
    # 64 weights; the factored layer frees 64 per component at 1.0. Per component the dense
    # layer looks cheaper (0.81/64 < 1/64), but its 16 drops above break-even free nothing:
    # it pays 13.8 for what the factored layer gives for 1.0.
    specs = [LayerSpec("dense", 32, 32), LayerSpec("factored", 32, 32, rank=10)]
    spectra = {"dense": torch.full((32,), 0.9), "factored": torch.ones(10)}
    budget = 1024 + 10 * 64 - 64
    ranks = global_ranks(specs, spectra, budget)
    assert ranks == {"dense": None, "factored": 9}
    assert _total(specs, ranks) == budget
    crossing = {"dense": 15, "factored": None}  # what counting each component alone chose
    assert _total(specs, crossing) == budget
    assert _dropped_error(specs, spectra, ranks) < _dropped_error(specs, spectra, crossing) / 10
