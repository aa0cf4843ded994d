"""``plrd.save`` → ``plrd.load_pretrained`` / ``plrd.load`` give back the same model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plrd
from plrd.errors import InputError
from plrd.io.hf import CONFIG_FILE
from tests.tiny_models import tiny_llama, token_batches


def _decomposed_llama() -> nn.Module:
    model = tiny_llama()
    plrd.decompose(model, keep=0.7, grams=plrd.collect_grams(model, token_batches()))
    return model


def test_hf_model_saved_by_plrd_loads_back_with_load_pretrained(tmp_path):
    model = _decomposed_llama()
    plrd.save(model, tmp_path / "member")
    loaded = plrd.load_pretrained(tmp_path / "member")
    ids = token_batches()[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert plrd.count_parameters(loaded) == plrd.count_parameters(model)
    prompt = ids[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU())


def test_plain_module_round_trips_and_load_pretrained_says_what_to_use(tmp_path):
    model = _mlp()
    x = torch.randn(5, 32)
    plrd.decompose(model, keep=0.6, grams=plrd.collect_grams(model, [x]))
    assert any(isinstance(m, plrd.LowRankLinear) for m in model.modules())
    plrd.save(model, tmp_path / "mlp")
    assert not (tmp_path / "mlp" / CONFIG_FILE).exists()

    fresh = plrd.load(tmp_path / "mlp", _mlp())
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)

    with pytest.raises(InputError) as err:
        plrd.load_pretrained(tmp_path / "mlp")
    message = str(err.value)
    assert "\n" not in message
    assert "not a Hugging Face model" in message and "plrd.load(" in message
