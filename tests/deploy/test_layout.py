"""``decode_layout``: weights re-laid along their longer dimension, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plrd
from plrd.deploy.layout import decode_layout


@pytest.fixture
def member(llama) -> nn.Module:
    """The tiny tied-embedding Llama decomposed to 0.7 of its size (factored and dense layers)."""
    plrd.decompose(llama, 0.7, method="svd", progress=False)
    return llama


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear weight and factor by name (the tied head as ``lm_head.weight``)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, plrd.LowRankLinear):
            found |= {f"{name}.down": module.down, f"{name}.up": module.up}
        elif isinstance(module, nn.Linear):
            found[f"{name}.weight"] = module.weight
    return found


def test_wide_weights_are_relaid_and_outputs_kept(member):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = member(input_ids=ids).logits
    shapes = {name: w.shape for name, w in _weights(member).items()}
    factored = [m for m in member.modules() if isinstance(m, plrd.LowRankLinear)]
    assert factored, "the fixture must hold factored layers"

    moved = decode_layout(member)

    weights = _weights(member)
    wide = [name for name, w in weights.items() if w.shape[0] > w.shape[1]]
    assert moved == len(wide) > len(factored)  # every up factor, the MLP's wide layers, the head
    for name, w in weights.items():
        assert w.shape == shapes[name], name
        assert w.is_contiguous() == (name not in wide), name
        if name in wide:
            assert w.stride() == (1, w.shape[0]), name
    assert member.lm_head.weight is member.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(member(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert decode_layout(member) == 0


def test_greedy_tokens_unchanged(member):
    ids = torch.tensor([[3, 17, 42, 5]])
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    expected = member.generate(ids, **settings)
    decode_layout(member)
    assert torch.equal(member.generate(ids, **settings), expected)


def test_saved_after_relayout_and_loaded_back(member, tmp_path):
    decode_layout(member)
    plrd.save(member, tmp_path / "m")
    assert not member.lm_head.weight.is_contiguous()  # the saved model keeps its layout
    loaded = plrd.load_pretrained(tmp_path / "m")
    state, loaded_state = member.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name
        assert loaded_state[name].is_contiguous(), name


def test_not_a_module_is_refused():
    from plrd.errors import InputError

    with pytest.raises(InputError, match="decode_layout needs a torch.nn.Module as model, got str"):
        decode_layout("member-0.70")
