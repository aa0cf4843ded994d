"""Sequential calibration and refit: block-by-block cuts on tiny HF models, and their math."""

import copy

import pytest
import torch
from torch import nn

import plrd
from plrd.core.factorize import refit_up
from plrd.core.kinds import as_linear
from plrd.core.sequential import REFIT_DAMPING, decompose_sequentially, find_blocks
from plrd.core.surgery import plan_decomposition
from plrd.errors import InputError
from tests.helpers import logits
from tests.tiny_models import TINY_MODELS, tiny_llama, token_batches

KEEP = 0.6


def _cut(model, calibration, batches, damping=REFIT_DAMPING):
    """``model`` cut to KEEP (uniform ranks) with the uncut model's Grams or block by block."""
    grams = plrd.collect_grams(model, batches, progress=False)
    planned = plan_decomposition(model, KEEP, grams=grams, progress=False)
    if calibration == "uncut":
        return plrd.decompose(model, KEEP, grams=grams, progress=False)
    refit = calibration == "refit"
    return decompose_sequentially(model, planned, batches, refit, damping, progress=False)


def _inputs(model, name, batches):
    """Rows [tokens, in] that layer ``name`` of ``model`` reads on ``batches``."""
    seen = []
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen).double()


def _weight(layer):
    if isinstance(layer, plrd.LowRankLinear):
        return layer.dense_weight().double()
    return layer.weight.detach().double()


LAST = "model.layers.1.mlp.down_proj"


def _data(seed=1, rows=300, features=6, outputs=5, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    x_p = torch.randn(rows, features, generator=g, dtype=torch.float64)
    x_c = x_p + drift * torch.randn(rows, features, generator=g, dtype=torch.float64)
    weight = torch.randn(outputs, features, generator=g, dtype=torch.float64)
    down = torch.randn(3, features, generator=g, dtype=torch.float64)
    up = torch.randn(outputs, 3, generator=g, dtype=torch.float64)
    return x_p, x_c, weight, down, up


def test_refit_up_solves_the_least_squares_fit_to_the_uncut_outputs():
    x_p, x_c, weight, down, up = _data()
    cross, gram = x_p.T @ x_c, x_c.T @ x_c
    fitted = refit_up(down, up, weight @ cross, gram, 0.0)
    best = torch.linalg.lstsq(x_c @ down.T, x_p @ weight.T).solution.T
    assert torch.allclose(fitted, best, atol=1e-8)


def test_refit_up_damping_keeps_up_where_it_was():
    x_p, x_c, weight, down, up = _data()
    cross, gram = x_p.T @ x_c, x_c.T @ x_c
    free = refit_up(down, up, weight @ cross, gram, 0.0)
    damped = refit_up(down, up, weight @ cross, gram, 1e6)
    assert (damped - up).norm() < 1e-3 * (free - up).norm()


@pytest.mark.parametrize("calibration", ["sequential", "refit"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_block_by_block_cut_keeps_the_planned_ranks_and_a_working_model(arch, calibration):
    batches = token_batches(count=4, batch=2, length=16)
    model, reference = TINY_MODELS[arch](), TINY_MODELS[arch]()
    report = _cut(model, calibration, batches)
    expected = _cut(reference, "uncut", batches)
    assert [r.rank_after for r in report.layers] == [r.rank_after for r in expected.layers]
    assert report.params_after == expected.params_after == plrd.count_parameters(model)
    assert torch.isfinite(logits(model, batches[0])).all()


def test_the_first_layers_are_cut_as_from_the_uncut_model_and_later_ones_differ():
    batches = token_batches(count=4, batch=2, length=16)
    uncut, sequential = tiny_llama(), tiny_llama()
    _cut(uncut, "uncut", batches)
    _cut(sequential, "sequential", batches)
    first = "model.layers.0.self_attn.q_proj"  # its inputs do not depend on any cut layer
    assert torch.allclose(
        _weight(uncut.get_submodule(first)), _weight(sequential.get_submodule(first))
    )
    assert not torch.allclose(
        _weight(uncut.get_submodule(LAST)), _weight(sequential.get_submodule(LAST))
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_layer_is_whitened_on_the_inputs_the_finished_cut_model_gives_it(arch):
    """Every layer's inputs depend only on the layers before it, so the Gram the finished model
    gives a layer is the one it was cut with (this fails if a block run sees stale KV cache).
    Compared on those inputs: where they never reach (a cut v_proj leaves o_proj's inputs in a
    subspace), the weights are free."""
    batches = token_batches(count=8, batch=4, length=16)
    dense = TINY_MODELS[arch]()
    cut = copy.deepcopy(dense)
    report = _cut(cut, "sequential", batches)
    final_grams = plrd.collect_grams(cut, batches, progress=False)
    changed = [row for row in report.layers if row.rank_after != row.rank_before]
    assert len(changed) >= 4
    for row in changed:
        layer = dense.get_submodule(row.name)
        layer = as_linear(layer) if arch == "gpt2" else layer
        expected = plrd.LowRankLinear.from_linear(layer, row.rank_after, final_grams[row.name])
        x_c = _inputs(cut, row.name, batches)
        got = x_c @ _weight(cut.get_submodule(row.name)).T
        want = x_c @ expected.dense_weight().double().T
        assert (got - want).norm() < 1e-3 * want.norm(), row.name


def test_refit_keeps_the_uncut_subspace_and_solves_up_for_the_uncut_outputs():
    """down as from the uncut Grams; up the least-squares map from what the finished model
    feeds the layer to what the uncut layer computed."""
    batches = token_batches(count=8, batch=2, length=16)
    dense = tiny_llama()
    uncut, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    _cut(uncut, "uncut", batches)
    report = _cut(refit, "refit", batches, damping=0.0)
    changed = [row.name for row in report.layers if row.rank_after != row.rank_before]
    assert len(changed) >= 4
    for name in changed:
        got, plain = refit.get_submodule(name), uncut.get_submodule(name)
        assert torch.equal(got.down, plain.down), name
        x_p, x_c = _inputs(dense, name, batches), _inputs(refit, name, batches)
        target = x_p @ _weight(dense.get_submodule(name)).T
        codes = x_c @ got.down.double().T
        best = torch.linalg.lstsq(codes, target).solution.T
        # compared through the layer's outputs: o_proj's codes are ill-conditioned (a cut v_proj)
        error = (codes @ (got.up.double() - best).T).norm()
        assert error < 1e-3 * (codes @ best.T).norm(), name
        if name == LAST:
            errors = [
                float(((x_c @ _weight(m.get_submodule(name)).T - target) ** 2).sum())
                for m in (refit, uncut)
            ]
            assert errors[0] < errors[1]


def test_a_model_without_blocks_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [torch.randn(8, 16) for _ in range(2)]
    grams = plrd.collect_grams(model, batches, targets=["0", "2"], progress=False)
    planned = plan_decomposition(model, 0.5, targets=["0", "2"], grams=grams, progress=False)
    with pytest.raises(InputError, match="nn.ModuleList of blocks"):
        decompose_sequentially(model, planned, batches, progress=False)
    assert find_blocks(tiny_llama(), ["model.layers.1.mlp.up_proj"])[1].layers == [
        "model.layers.1.mlp.up_proj"
    ]


def test_plain_svd_cannot_be_cut_sequentially():
    model = tiny_llama()
    planned = plan_decomposition(model, KEEP, method="svd", progress=False)
    with pytest.raises(InputError, match="needs method='whiten'"):
        decompose_sequentially(model, planned, token_batches(), progress=False)
