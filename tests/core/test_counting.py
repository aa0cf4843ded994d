"""count_parameters: tied and shared tensors count once; factored layers count r·(in+out)."""

import torch
from torch import nn

import plrd
from tests.tiny_models import HIDDEN, VOCAB, tiny_gpt2, tiny_llama


def dense_params(in_features: int, out_features: int, bias: bool) -> int:
    """Parameters of a dense layer: ``in·out (+ out)``."""
    return in_features * out_features + (out_features if bias else 0)


def lowrank_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of a rank-r factored layer: ``r·(in+out) (+ out)``."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def _naive(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tied_embedding_counts_once():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert plrd.count_parameters(untied) - plrd.count_parameters(tied) == VOCAB * HIDDEN
    assert plrd.count_parameters(tied) == _naive(tied)  # parameters() dedups identical objects


def test_distinct_parameters_sharing_storage_count_once():
    base = nn.Linear(8, 4)
    other = nn.Linear(8, 4)
    other.weight = nn.Parameter(base.weight.data)  # a different Parameter on the same storage
    model = nn.Sequential(base, other)
    assert _naive(model) == 2 * (32 + 4)
    assert plrd.count_parameters(model) == 32 + 4 + 4


def test_gpt2_counts_conv1d_and_tied_head():
    model = tiny_gpt2()
    assert plrd.count_parameters(model) == _naive(model)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_lowrank_layer_count():
    layer = plrd.LowRankLinear(48, 20, 5)
    assert plrd.count_parameters(layer) == lowrank_params(48, 20, 5, bias=True) == 5 * 68 + 20
    assert plrd.count_parameters(nn.Linear(48, 20, bias=False)) == dense_params(48, 20, False)


def test_views_with_different_shapes_are_distinct():
    storage = torch.zeros(10)
    model = nn.Module()
    model.a = nn.Parameter(storage[:4])
    model.b = nn.Parameter(storage[4:])
    assert plrd.count_parameters(model) == 10
