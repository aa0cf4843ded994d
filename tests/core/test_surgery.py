"""decompose: parameter targets on tiny HF models, re-decomposition, targeting, errors, report."""

import copy
import json

import pytest
import torch
from torch import nn

import plrd
from plrd.core.budget import smallest_fraction
from plrd.core.kinds import as_linear
from plrd.core.targets import find_targets, head_names
from plrd.errors import InputError
from tests.helpers import logits, snapshot, unchanged
from tests.tiny_models import TINY_MODELS, tiny_bert, tiny_gpt2, tiny_llama, token_batches

KEEP = 0.55


def _lowrank(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, plrd.LowRankLinear)}


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_decompose_lands_on_target_then_truncates_further(arch, allocation):
    model = TINY_MODELS[arch]()
    batches = token_batches()
    before = plrd.count_parameters(model)
    grams = plrd.collect_grams(model, batches, progress=False)
    report = plrd.decompose(model, KEEP, grams=grams, allocation=allocation, progress=False)

    after = plrd.count_parameters(model)
    assert report.params_before == before and report.params_after == after
    assert abs(after - KEEP * before) <= 0.01 * KEEP * before
    assert torch.isfinite(logits(model, batches[0])).all()
    first = {n: m.rank for n, m in _lowrank(model).items()}
    assert len(first) >= len(report.layers) // 2
    assert not any(n.endswith(("lm_head", "decoder")) for n in first)

    grams = plrd.collect_grams(model, batches, progress=False)
    again = plrd.decompose(model, 0.8, grams=grams, allocation=allocation, progress=False)
    final = plrd.count_parameters(model)
    assert abs(final - 0.8 * after) <= 0.01 * 0.8 * after
    assert again.params_before == after
    ranks = {n: m.rank for n, m in _lowrank(model).items()}
    assert all(ranks[n] <= r for n, r in first.items())  # truncated, never grown
    assert any(ranks[n] < r for n, r in first.items())
    assert torch.isfinite(logits(model, batches[0])).all()


def test_svd_method_needs_no_grams_and_whiten_beats_it_on_calibration_error():
    batches = token_batches(count=4, batch=4, length=16)
    dense = tiny_llama()
    grams = plrd.collect_grams(dense, batches, progress=False)
    white, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    plrd.decompose(white, 0.6, grams=grams, progress=False)
    plrd.decompose(plain, 0.6, method="svd", progress=False)
    # same uniform ranks; each whitened layer minimises trace(ΔW G ΔWᵀ) for its own Gram
    for name, layer in _lowrank(white).items():
        other = plain.get_submodule(name)
        assert layer.rank == other.rank
        weight = dense.get_submodule(name).weight.detach().double()
        g = grams[name]

        def error(lr, weight=weight, g=g):
            delta = weight - lr.up.detach().double() @ lr.down.detach().double()
            return float(torch.trace(delta @ g @ delta.T))

        assert error(layer) <= error(other) * (1 + 1e-9)


def test_gpt2_conv1d_is_converted_exactly():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv).__name__ == "Conv1D"
    x = torch.randn(3, 5, 64)
    linear = as_linear(conv)
    assert linear.weight.shape == (192, 64)
    torch.testing.assert_close(linear(x), conv(x))
    full = plrd.LowRankLinear.from_linear(linear, 64)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    assert "transformer.h.0.attn.c_attn" in find_targets(model)
    assert head_names(model) == {"lm_head"}


def test_keep_one_changes_nothing_and_factored_layers_stay():
    model = tiny_llama()
    report = plrd.decompose(model, 1.0, method="svd", progress=False)
    assert not _lowrank(model) and all(not c.changed for c in report.layers)
    plrd.decompose(model, 0.5, method="svd", progress=False)
    ranks = {n: m.rank for n, m in _lowrank(model).items()}
    report = plrd.decompose(model, 1.0, method="svd", progress=False)
    assert {n: m.rank for n, m in _lowrank(model).items()} == ranks
    assert report.params_after == report.params_before


def test_near_full_keep_leaves_layers_dense_at_break_even():
    model = tiny_llama()
    before = plrd.count_parameters(model)
    report = plrd.decompose(model, 0.995, method="svd", progress=False)
    assert abs(report.params_after - 0.995 * before) <= 0.01 * 0.995 * before
    dense = [c for c in report.layers if c.rank_after is None]
    assert dense and isinstance(model.get_submodule(dense[0].name), nn.Linear)


def test_targets_and_exclude_patterns():
    model = tiny_llama()
    report = plrd.decompose(model, 0.8, targets="mlp.*", method="svd", progress=False)
    assert {c.name.split(".")[-1] for c in report.layers} == {"gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)

    model = tiny_llama()
    report = plrd.decompose(
        model, 0.8, exclude=["q_proj", r".*\.layers\.1\..*"], method="svd", progress=False
    )
    names = [c.name for c in report.layers]
    assert names and not any("q_proj" in n or ".layers.1." in n for n in names)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)

    model = tiny_llama()
    report = plrd.decompose(model, 0.97, targets=".*v_proj", method="svd", progress=False)
    assert [c.name for c in report.layers] == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]


def test_default_targets_skip_heads_and_tied_layers():
    untied = tiny_llama(tie=False)
    assert "lm_head" not in find_targets(untied)
    assert "lm_head" in find_targets(untied, targets="lm_head")  # explicit, untied: allowed
    tied = tiny_llama(tie=True)
    with pytest.raises(InputError, match="'lm_head' matches no linear layer"):
        find_targets(tied, targets="lm_head")  # tied to the embedding: never
    bert = tiny_bert()
    assert "cls.predictions.decoder" in head_names(bert)
    assert "cls.predictions.decoder" not in find_targets(bert)


def test_report_table_and_dict():
    model = tiny_llama()
    # 8 tokens for 128-wide down_proj inputs: their Gram is singular, a ridge is needed
    grams = plrd.collect_grams(model, token_batches(count=1, batch=1, length=8), progress=False)
    report = plrd.decompose(model, 0.6, grams=grams, progress=False)
    text = str(report)
    assert "model.layers.0.self_attn.q_proj" in text and "dense -> " in text
    assert f"{report.params_after:,}" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["rank_before"] == "dense"
    assert isinstance(data["layers"][0]["rank_after"], int)
    assert sum(c["params_before"] for c in data["layers"]) < data["params_before"]
    assert report.ridges and all(r > 0 for r in report.ridges.values())
    assert "model.layers.0.mlp.down_proj" in report.ridges
    assert "Cholesky ridge" in report.ridge_note() and "calibration tokens" in report.ridge_note()


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_keep(keep):
    model = tiny_llama()
    with pytest.raises(InputError, match="keep"):
        plrd.decompose(model, keep, method="svd", progress=False)


def test_unreachable_keep_names_the_minimum():
    model = tiny_llama()
    state = snapshot(model)
    layers = find_targets(model).values()
    weights = sum(m.in_features * m.out_features for m in layers)
    smallest = (
        plrd.count_parameters(model) - weights + sum(m.in_features + m.out_features for m in layers)
    )
    assert smallest_fraction(model) == smallest / plrd.count_parameters(model)
    assert smallest_fraction(model, targets="mlp.*") > smallest_fraction(model)
    minimum = f"{smallest / plrd.count_parameters(model):.4f}"
    with pytest.raises(InputError, match=f"smallest reachable keep is {minimum}"):
        plrd.decompose(model, 0.05, method="svd", progress=False)
    assert unchanged(model, state)
    report = plrd.decompose(model, float(minimum) + 1e-4, method="svd", progress=False)
    assert {c.rank_after for c in report.layers} == {1}


def test_whiten_without_grams_says_how_to_fix():
    model = tiny_llama()
    with pytest.raises(InputError, match=r"plrd\.collect_grams.*method='svd'"):
        plrd.decompose(model, 0.5, progress=False)
    grams = plrd.collect_grams(model, token_batches(), targets="mlp.*", progress=False)
    with pytest.raises(InputError, match="no Gram matrix .*self_attn"):
        plrd.decompose(model, 0.5, grams=grams, progress=False)
    grams = plrd.collect_grams(model, token_batches(), progress=False)
    grams["model.layers.0.self_attn.o_proj"] = torch.eye(3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"o_proj.*\(3, 3\)"):
        plrd.decompose(model, 0.5, grams=grams, progress=False)


def test_non_finite_weight_names_the_layer_and_leaves_model_untouched():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    state = snapshot(model)
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj.*non-finite"):
        plrd.decompose(model, 0.5, method="svd", progress=False)
    assert all(
        torch.equal(a, b) or (a.isnan() == b.isnan()).all()
        for a, b in zip(model.state_dict().values(), state.values(), strict=True)
    )
    assert not _lowrank(model)


def test_unknown_method_allocation_and_pattern():
    model = tiny_llama()
    with pytest.raises(InputError, match="method='asvd'.*whiten, svd"):
        plrd.decompose(model, 0.5, method="asvd", progress=False)
    with pytest.raises(InputError, match="allocation='greedy'"):
        plrd.decompose(model, 0.5, method="svd", allocation="greedy", progress=False)
    with pytest.raises(InputError, match=r"'attn\.qkv'.*available layers: model\.layers\.0"):
        plrd.decompose(model, 0.5, targets="attn.qkv", method="svd", progress=False)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_decompose_equals_from_linear_and_factors_each_gram_once(allocation, monkeypatch):
    import plrd.core.surgery as surgery

    dense = tiny_llama()
    grams = plrd.collect_grams(dense, token_batches(), progress=False)
    model = copy.deepcopy(dense)
    calls = []
    original = surgery.cholesky_factor

    def counting(gram, name=None):
        calls.append(id(gram))
        return original(gram, name)

    monkeypatch.setattr(surgery, "cholesky_factor", counting)
    plrd.decompose(model, 0.6, grams=grams, allocation=allocation, progress=False)
    factored = _lowrank(model)
    assert len(calls) == len(set(calls))  # q/k/v and gate/up share one Cholesky
    # uniform factors only the layers it cuts; global needs every layer's whitened spectrum
    needed = factored if allocation == "uniform" else grams
    assert set(calls) == {id(grams[n]) for n in needed}
    for name, layer in factored.items():
        reference = plrd.LowRankLinear.from_linear(
            dense.get_submodule(name), layer.rank, grams[name]
        )
        torch.testing.assert_close(layer.up, reference.up, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.down, reference.down, rtol=1e-5, atol=1e-6)
        assert layer.up.is_contiguous() and layer.down.is_contiguous()
        assert layer.down.untyped_storage().nbytes() == layer.down.numel() * 4  # no cache kept


def test_min_saving_factors_only_layers_that_save_that_much_and_still_meets_the_target():
    model = tiny_llama()
    batches = token_batches()
    before = plrd.count_parameters(model)
    grams = plrd.collect_grams(model, batches, progress=False)
    report = plrd.decompose(model, 0.8, grams=grams, min_saving=0.25, progress=False)
    assert abs(report.params_after - 0.8 * before) <= 0.01 * before
    changed = [row for row in report.layers if row.rank_after is not None]
    assert changed
    for row in changed:
        dense = row.in_features * row.out_features
        assert row.rank_after * (row.in_features + row.out_features) <= 0.75 * dense, row


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.2"])
def test_bad_min_saving_is_refused_before_any_change(bad):
    model = tiny_llama()
    grams = plrd.collect_grams(model, token_batches(), progress=False)
    before = snapshot(model)
    with pytest.raises(InputError, match="min_saving must be a fraction in"):
        plrd.decompose(model, 0.8, grams=grams, min_saving=bad, progress=False)
    assert unchanged(model, before)
