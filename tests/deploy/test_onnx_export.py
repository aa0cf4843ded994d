"""ONNX export of a tiny Llama member and its dense parent (offline, CPU, one thread).

The tiny models are built from a config (vocab 96, hidden 64, MLP 128, 2 layers, 4 query and 2
key/value heads, tied embeddings) with a word-level tokenizer, saved as a Hugging Face
directory (the parent) and decomposed to a member directory. Each is exported once per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import plrd  # noqa: E402
from plrd.deploy.errors import ExportError, MissingExtraError  # noqa: E402
from plrd.deploy.onnx_export import export_onnx  # noqa: E402
from plrd.deploy.onnx_graph import expected_weight_products, graph_weight_products  # noqa: E402
from plrd.deploy.onnx_runtime import OnnxCausalLM  # noqa: E402
from plrd.deploy.onnx_validate import PromptCheck  # noqa: E402

VOCAB, HIDDEN, MLP, LAYERS = 96, 64, 128, 2
TOL = 1e-4
NEW_TOKENS = 20


def word_tokenizer():
    """Whitespace word-level tokenizer over ``<unk> <eos> w2 … w95`` (vocab 96)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_parent() -> torch.nn.Module:
    """Random tiny Llama; initializer_range 0.2 so that greedy decoding does not repeat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """{'parent': HF directory, 'member': plrd member directory (keep 0.7, SVD)}."""
    root = tmp_path_factory.mktemp("onnx-src")
    tokenizer, model = word_tokenizer(), tiny_parent()
    model.save_pretrained(root / "parent")
    tokenizer.save_pretrained(root / "parent")
    plrd.decompose(model, keep=0.7, method="svd", progress=False)
    plrd.save(model, root / "member")
    model.config.save_pretrained(root / "member")
    tokenizer.save_pretrained(root / "member")
    return {"parent": root / "parent", "member": root / "member"}


@pytest.fixture(scope="module")
def exports(dirs, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """{'member'|'parent': (export dir, ExportReport)}, validated with the default prompts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx-out")
    out = {}
    for name in ("member", "parent"):
        report = export_onnx(dirs[name], root / name, threads=1)
        out[name] = (root / name, report)
    return out


@pytest.fixture(scope="module")
def member(dirs) -> torch.nn.Module:
    return plrd.load_pretrained(dirs["member"])


def test_export_writes_graph_config_tokenizer_and_metadata(exports):
    out, report = exports["member"]
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "plrd-export.json"} <= names
    meta = json.loads((out / "plrd-export.json").read_text())
    assert meta["exporter"] == "torch.onnx.export(dynamo=True)" and meta["opset"] >= 18
    inputs = {i["name"]: i["shape"] for i in meta["inputs"]}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert [o["name"] for o in meta["outputs"]][:2] == ["logits", "present.0.key"]
    validation = meta["validation"]
    assert validation["passed"] and len(validation["prompts"]) == 3
    assert validation["max_abs_logit_diff"] <= TOL
    assert report.passed and len(report.factored_layers) == 7 * LAYERS
    assert "validation passed" in str(report)


def test_logits_match_pytorch_at_every_position(exports, member):
    """Batch 2 (one row left-padded), then prefix + rest through the cache, then 1-token steps."""
    runner = OnnxCausalLM(exports["member"][0], threads=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = member(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    logits, _ = runner.forward(ids.numpy(), mask.numpy())
    real = mask.numpy().astype(bool)
    assert np.abs(logits - ref)[real].max() <= TOL
    pieces, past = [], None
    for start, stop in [(0, 7), (7, 8), (8, 9), (9, 12)]:
        part, past = runner.forward(ids[:1, start:stop].numpy(), past=past)
        pieces.append(part)
    assert np.abs(np.concatenate(pieces, axis=1) - ref[:1]).max() <= TOL


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_greedy_20_tokens_equal_generate(exports, member, use_cache):
    runner = OnnxCausalLM(exports["member"][0], threads=1)
    ids = word_tokenizer()("w5 w17 w33 w2 w60 w61", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = member.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    got = runner.generate(ids.numpy(), NEW_TOKENS, use_cache=use_cache)
    assert got.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, ids.shape[1] :].tolist())) > 3  # a sequence worth comparing


def test_factored_layers_stay_two_matmuls(exports, member):
    path = exports["member"][0] / "model.onnx"
    products = graph_weight_products(path)
    assert products == expected_weight_products(member)
    assert len(products) == 2 * 7 * LAYERS + 1  # two per factored layer, plus the output head
    import onnx

    dense = {(64, 64), (32, 64), (128, 64), (64, 128), (64, 32)}
    shapes = {tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    assert not shapes & dense  # no [out, in] (or [in, out]) weight of a factored layer


def test_dense_parent_exports_through_the_same_path(exports, dirs):
    out, report = exports["parent"]
    assert report.passed and report.factored_layers == {}
    from transformers import AutoModelForCausalLM

    parent = AutoModelForCausalLM.from_pretrained(dirs["parent"])
    assert graph_weight_products(out / "model.onnx") == expected_weight_products(parent)
    assert exports["member"][1].parameters < report.parameters


def test_bad_inputs_raise_one_line_errors(tmp_path, dirs):
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ExportError, match="not a plrd member or Hugging Face model directory"):
        export_onnx(tmp_path / "junk", tmp_path / "out")
    from tests.tiny_models import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(ExportError, match="not a causal language model"):
        export_onnx(tmp_path / "bert", tmp_path / "out")
    with pytest.raises(ExportError, match="not a causal language model"):
        export_onnx(tiny_bert(), tmp_path / "out")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_onnx(dirs["member"], tmp_path / "junk")
    with pytest.raises(ExportError, match="has no model.onnx"):
        OnnxCausalLM(tmp_path / "junk")


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path, dirs):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'plrd\[onnx\]'") as info:
        export_onnx(dirs["member"], tmp_path / "out")
    assert isinstance(info.value, ImportError) and "\n" not in str(info.value)


def test_prompt_check_fails_beyond_tolerance_or_on_a_token_mismatch():
    good = PromptCheck(5, 20.0, 2e-4, 3e-5, [1, 2], [1, 2], [1, 2])
    assert good.passed(TOL, 1e-5) and not good.passed(TOL) and not good.passed(1e-5, 1e-6)
    assert not PromptCheck(5, 2.0, 2e-5, 3e-5, [1, 2], [1, 3], [1, 2]).passed(TOL)


def test_import_stays_light():
    code = (
        "import sys, plrd, plrd.deploy.onnx_export; "
        "print(any(m in sys.modules for m in ('onnx', 'onnxruntime', 'onnxscript')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sliding_window_cache_is_refused_clearly(tmp_path):
    from tests.tiny_models import tiny_mistral

    with pytest.raises(ExportError, match="DynamicSlidingWindowLayer"):
        export_onnx(tiny_mistral(), tmp_path / "out")
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_export(arch, tmp_path):
    """Qwen2 (biased projections: Gemm) and GPT-2 (Conv1D layers, learned positions)."""
    from tests.tiny_models import TINY_MODELS

    model = TINY_MODELS[arch]()
    plrd.decompose(model, keep=0.7, method="svd", progress=False)
    report = export_onnx(model, tmp_path / "out", threads=1)
    assert report.passed and report.max_abs_logit_diff <= TOL
    assert graph_weight_products(tmp_path / "out" / "model.onnx") == expected_weight_products(model)


def test_causal_check_reads_architectures_else_model_type():
    from transformers import BertConfig, LlamaConfig

    from plrd.deploy.onnx_export import _check_causal_config

    _check_causal_config(LlamaConfig(), "llama")  # config.save_pretrained: no architectures
    with pytest.raises(ExportError, match=r"not a causal language model \(BertForMaskedLM\)"):
        _check_causal_config(BertConfig(architectures=["BertForMaskedLM"]), "bert")
