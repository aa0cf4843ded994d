"""Bad input to the ``plrd`` command: one line naming the value and the fix, exit status 2, no
traceback, nothing written, before any model work (the unwritable output, unreadable data,
models with nothing to factor or damaged weights, sizes out of reach)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from plrd.cli.entry import EXIT_USAGE, main
from tests.helpers import one_line_error


@pytest.fixture
def base(tmp_path, tiny_model_dir, corpus_dir):
    def make(out=None, model=None, data=None):
        return [
            "family",
            "--out",
            str(out or tmp_path / "fam"),
            "--model",
            str(model or tiny_model_dir),
            "--data",
            str(data or corpus_dir),
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--no-progress",
        ]

    return make


def _variant(tiny_model_dir: Path, out: Path, edit) -> Path:
    """A copy of the tiny model with ``edit(config)`` applied or ``edit(model)`` run on it."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    edit(config, model)
    if config.num_hidden_layers != model.config.num_hidden_layers:
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_unwritable_output_is_refused_before_any_work(capsys, tmp_path, base):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(capsys, base(out=blocker / "fam"), "--out", "not writable")
    assert str(blocker / "fam") in line
    one_line_error(capsys, base(out=blocker), "exists and is not a directory")
    # the check creates nothing it does not keep
    nested = tmp_path / "new" / "deeper" / "fam"
    one_line_error(capsys, base(out=nested) + ["--sizes", "0.9,0.95"], "--sizes")
    assert not (tmp_path / "new").exists()


def test_read_only_output_directory(capsys, tmp_path, base):
    """A directory nobody may write into: mode 0555 for a normal user; root passes permission
    checks, so for root a directory of sysfs, which refuses new entries to everyone."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    else:
        ro = Path("/sys")
    try:
        one_line_error(capsys, base(out=ro / "plrd-fam"), "not writable")
    finally:
        if ro != Path("/sys"):
            ro.chmod(0o755)
    assert not (ro / "plrd-fam").exists()


def test_decompose_checks_its_output_too(capsys, tmp_path, tiny_model_dir, corpus_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["decompose", "--size", "0.8", "--out", str(blocker / "m"), "--model"]
    one_line_error(capsys, argv + [str(tiny_model_dir), "--data", str(corpus_dir)], "--out")


def test_binary_file_named_txt_is_refused(capsys, tmp_path, base):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    one_line_error(capsys, base(data=binary), "weights.txt", "not UTF-8")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"plain words\x00\x00\x00 and more words\n" * 200)
    one_line_error(capsys, base(data=nul), "nul.txt", "not text")
    assert not (tmp_path / "fam").exists()


def test_unreadable_and_undecodable_data(capsys, tmp_path, base, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    one_line_error(capsys, base(data=bad), "bad.jsonl", "not UTF-8")

    locked = tmp_path / "locked.txt"
    locked.write_text("some text\n\nmore text")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    one_line_error(capsys, base(data=locked), "locked.txt", "cannot be read", "Permission")
    assert not (tmp_path / "fam").exists()


def test_model_without_targetable_layers(capsys, tmp_path, base, tiny_model_dir):
    def no_layers(config, model):
        config.num_hidden_layers = 0

    empty = _variant(tiny_model_dir, tmp_path / "no-layers", no_layers)
    line = one_line_error(capsys, base(model=empty), "no linear layer", "lm_head")
    assert str(empty) in line
    assert not (tmp_path / "fam").exists()


def test_model_with_non_finite_weights(capsys, tmp_path, base, tiny_model_dir):
    def poison(config, model):
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")

    bad = _variant(tiny_model_dir, tmp_path / "nan-model", poison)
    one_line_error(capsys, base(model=bad), "model.layers.1.mlp.up_proj.weight", "NaN or inf")
    assert not (tmp_path / "fam").exists()


def test_sizes_out_of_reach_and_bad_fault_limit(capsys, tmp_path, base):
    one_line_error(capsys, base() + ["--sizes", "0.9,0.02"], "size 0.02", "out of reach")
    one_line_error(capsys, base() + ["--max-bad-steps", "-1"], "--max-bad-steps", ">= 0")
    assert not (tmp_path / "fam").exists()


def test_debug_shows_the_traceback_for_model_checks(capsys, tmp_path, base, tiny_model_dir):
    def no_layers(config, model):
        config.num_hidden_layers = 0

    empty = _variant(tiny_model_dir, tmp_path / "no-layers", no_layers)
    assert main(base(model=empty) + ["--debug"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" in err and "no linear layer" in err


def test_a_copied_family_manifest_is_not_mistaken_for_this_run(capsys, tmp_path, base):
    # an --out holding a family of another model: refused by the resume check, one line
    out = tmp_path / "fam"
    out.mkdir()
    (out / "family.json").write_text(
        json.dumps({"config": {"model": "other", "seq_len": 32}, "corpus": {}, "members": []})
    )
    one_line_error(capsys, base(out=out), "other settings")
    shutil.rmtree(out)


def test_seed_context_and_unloadable_model_config(capsys, tmp_path, base, tiny_model_dir):
    one_line_error(capsys, base() + ["--seed", "-1"], "--seed", "[0, 2^32)")
    line = one_line_error(capsys, base() + ["--seq-len", "4096"], "--seq-len: 4096", "context")
    assert "use 128 or less" in line
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{ not json")
    one_line_error(capsys, base(model=broken), f"--model: {broken} cannot be loaded")
    assert not (tmp_path / "fam").exists()
