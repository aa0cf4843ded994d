"""Every member written by ``plrd family`` and ``plrd decompose`` carries a model card with valid
YAML front matter."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from plrd.cli.entry import main
from plrd.family.card import parent_card_data
from plrd.family.schedule import build_family


def _card(member) -> ModelCard:
    text = (member / "README.md").read_text()
    assert text.startswith("---\n")
    return ModelCard(text)


def test_family_members_have_model_cards(make_config, tmp_path):
    cfg = make_config(tokens_per_stage=64)
    record = build_family(cfg, say=lambda _m: None)
    for entry in record["members"]:
        card = _card(tmp_path / "family" / entry["path"])
        assert card.data.library_name == "plrd" and "plrd" in card.data.tags
        assert card.data.base_model
        assert f"{entry['tokens']:,} tokens" in card.text
        assert f"{entry['general_ppl']:.2f}" in card.text and "load_pretrained" in card.text


def test_decompose_writes_a_card_with_the_parents_license(tmp_path, tiny_model_dir, corpus_dir):
    parent = tmp_path / "parent"
    import shutil

    shutil.copytree(tiny_model_dir, parent)
    (parent / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    argv = ["decompose", "--size", "0.8", "--out", str(tmp_path / "m"), "--model", str(parent)]
    argv += ["--data", str(corpus_dir), "--seq-len", "32", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    card = _card(tmp_path / "m")
    assert card.data.license == "mit" and card.data.library_name == "plrd"
    metrics = json.loads((tmp_path / "m" / "member.json").read_text())
    assert f"{metrics['zero_shot_ppl']:.2f}" in card.text


def test_the_default_parent_is_known():
    assert parent_card_data("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
