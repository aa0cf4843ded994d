"""save/load: identical outputs, tied weights stay tied, mismatched checkpoints refused."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import plrd
from plrd.errors import DamagedFileError, InputError
from plrd.io.info import INFO_FILE, WEIGHTS_FILE
from tests.helpers import decomposed, logits, snapshot, unchanged, written
from tests.tiny_models import TINY_MODELS, tiny_gpt2, tiny_llama, token_batches


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_round_trip_gives_identical_outputs(arch, tmp_path):
    build = TINY_MODELS[arch]
    model = decomposed(build)
    batch = token_batches(count=1)[0]
    expected = logits(model, batch)
    plrd.save(model, tmp_path / "ckpt")

    assert written(tmp_path / "ckpt") == [WEIGHTS_FILE, INFO_FILE]
    info = json.loads((tmp_path / "ckpt" / INFO_FILE).read_text())
    assert info["format"] == "plrd" and info["format_version"] == 2
    assert info["num_parameters"] == plrd.count_parameters(model)
    assert info["dtype"] == "float32"
    recorded = {e["name"]: e for e in info["layers"]}
    for name, module in model.named_modules():
        if isinstance(module, plrd.LowRankLinear):
            assert recorded.pop(name) == {
                "name": name,
                "in": module.in_features,
                "out": module.out_features,
                "rank": module.rank,
                "bias": module.bias is not None,
            }
    assert not recorded

    fresh = build()
    assert plrd.load(tmp_path / "ckpt", fresh) is fresh
    assert torch.equal(logits(fresh, batch), expected)
    assert plrd.count_parameters(fresh) == plrd.count_parameters(model)


def test_tied_weights_stored_once_and_still_tied(tmp_path):
    model = decomposed()
    plrd.save(model, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("model.embed_tokens.weight" in keys)
    fresh = tiny_llama()
    with torch.no_grad():
        fresh.model.embed_tokens.weight.zero_()
    plrd.load(tmp_path, fresh)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    # still tied in training: one update moves both
    with torch.no_grad():
        fresh.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(fresh.lm_head.weight, fresh.model.embed_tokens.weight)


def test_dense_model_round_trip_and_overwrite(tmp_path):
    model = tiny_gpt2()
    plrd.save(model, tmp_path)
    assert json.loads((tmp_path / INFO_FILE).read_text())["layers"] == []
    plrd.decompose(model, 0.7, method="svd", progress=False)
    plrd.save(model, tmp_path)  # overwrite in place, no temporaries left
    assert written(tmp_path) == [WEIGHTS_FILE, INFO_FILE]
    fresh = tiny_gpt2()
    plrd.load(tmp_path, fresh)
    batch = token_batches(count=1)[0]
    assert torch.equal(logits(fresh, batch), logits(model, batch))


def test_keeps_device_dtype_and_training_mode(tmp_path):
    model = decomposed()
    plrd.save(model, tmp_path)
    fresh = tiny_llama().double().train()
    plrd.load(tmp_path, fresh)
    layer = fresh.model.layers[0].self_attn.q_proj
    assert isinstance(layer, plrd.LowRankLinear)
    assert layer.up.dtype == torch.float64 and layer.training and layer.up.requires_grad


def test_other_architecture_refused(tmp_path):
    plrd.save(decomposed(), tmp_path)
    model = tiny_gpt2()
    state = snapshot(model)
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE}: layer 'model\.layers\.0.*does not"):
        plrd.load(tmp_path, model)
    assert unchanged(model, state)


def _edit_manifest(path, edit):
    info = json.loads((path / INFO_FILE).read_text())
    edit(info)
    (path / INFO_FILE).write_text(json.dumps(info))


def test_manifest_shape_and_bias_mismatch_refused(tmp_path):
    plrd.save(decomposed(), tmp_path)
    _edit_manifest(tmp_path, lambda info: info["layers"][0].update({"in": 65}))
    with pytest.raises(DamagedFileError, match=r"plrd\.json: layer 'model.*recorded as 64x65"):
        plrd.load(tmp_path, tiny_llama())
    _edit_manifest(tmp_path, lambda info: info["layers"][0].update({"in": 64, "bias": True}))
    with pytest.raises(DamagedFileError, match="recorded with bias=True"):
        plrd.load(tmp_path, tiny_llama())


def test_rank_mismatch_with_weights_refused_and_model_untouched(tmp_path):
    plrd.save(decomposed(), tmp_path)
    _edit_manifest(tmp_path, lambda info: info["layers"][0].update({"rank": 3}))
    model = tiny_llama()
    state = snapshot(model)
    mismatch = rf"{WEIGHTS_FILE}: holds layer '.*q_proj' at rank \d+"
    mismatch += rf".* {INFO_FILE} records rank 3"
    with pytest.raises(DamagedFileError, match=mismatch):
        plrd.load(tmp_path, model)
    assert unchanged(model, state)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_already_factored_model_refused(tmp_path):
    saved = tiny_llama()
    plrd.decompose(saved, 0.9, targets="self_attn.*", method="svd", progress=False)
    plrd.save(saved, tmp_path)
    model = tiny_llama()
    plrd.decompose(model, 0.9, targets="mlp.*", method="svd", progress=False)
    unrecorded = r"factored layer\(s\) not recorded.*'model\.layers\.0\.mlp"
    with pytest.raises(DamagedFileError, match=unrecorded):
        plrd.load(tmp_path, model)


def test_missing_or_corrupt_files_refused(tmp_path):
    with pytest.raises(InputError, match=rf"{INFO_FILE} not found"):
        plrd.load(tmp_path, tiny_llama())
    plrd.save(decomposed(), tmp_path)
    (tmp_path / INFO_FILE).write_text("{not json")
    with pytest.raises(DamagedFileError, match=rf"{INFO_FILE}: cannot be read as JSON"):
        plrd.load(tmp_path, tiny_llama())
    (tmp_path / INFO_FILE).write_text(json.dumps({"format": "plrd", "format_version": 99}))
    with pytest.raises(InputError, match="format_version 99"):
        plrd.load(tmp_path, tiny_llama())
    plrd.save(decomposed(), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(
        DamagedFileError, match=rf"{WEIGHTS_FILE}: the safetensors header is not valid"
    ):
        plrd.load(tmp_path, tiny_llama())
