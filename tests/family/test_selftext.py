"""Text written by the parent: deterministic, cached by parent, seed and length, resumable after
a kill, and made again for another parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from plrd.family.selftext import SelfText, model_digest, row_documents
from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
ROWS, LENGTH, CHUNK = 12, 24, 2  # 6 chunks
EOS = 1

# A generation slowed down per chunk so that a kill lands after the first chunks are cached.
SLOW = f"""
import sys, time
import torch
import plrd.family.selftext as st
from tests.tiny_models import tiny_llama
_rows = st.generate_rows
def slow(*a, **k):
    time.sleep(0.4)
    return _rows(*a, **k)
st.generate_rows = slow
torch.set_num_threads(1)
model = tiny_llama()
source = st.SelfText(sys.argv[1], st.model_digest(model), 0, {LENGTH}, chunk_rows={CHUNK})
source.rows(model, {ROWS}, {{0}}, {EOS})
"""


def _rows(cache: Path, model: torch.nn.Module) -> torch.Tensor:
    source = SelfText(cache, model_digest(model), 0, LENGTH, chunk_rows=CHUNK)
    return source.rows(model, ROWS, {0}, EOS)


def test_generation_is_deterministic_and_read_back_from_the_cache(tmp_path):
    model = tiny_llama()
    first = _rows(tmp_path / "a", model)
    assert first.shape == (ROWS, LENGTH)
    again = _rows(tmp_path / "a", model)  # from the cache
    assert torch.equal(first, again)
    assert torch.equal(first, _rows(tmp_path / "b", model))  # made anew, the same
    docs = row_documents(first, EOS)
    assert all(EOS not in d[1:] for d in docs) and all(len(d) >= 1 for d in docs)


def test_a_killed_generation_resumes_at_the_first_missing_chunk(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(cache)], env=env)
    model = tiny_llama()
    source = SelfText(cache, model_digest(model), 0, LENGTH, chunk_rows=CHUNK)
    deadline = time.time() + 120
    while source.cached_chunks() < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = source.cached_chunks()
    assert proc.returncode == -signal.SIGKILL, f"the generation ended by itself ({proc.returncode})"
    assert 2 <= done < ROWS // CHUNK, done
    stamps = {i: source.chunk_path(i).stat().st_mtime_ns for i in range(done)}
    resumed = source.rows(model, ROWS, {0}, EOS)
    assert all(source.chunk_path(i).stat().st_mtime_ns == t for i, t in stamps.items())
    assert torch.equal(resumed, _rows(tmp_path / "uninterrupted", model))
    leftovers = [p for p in source.directory.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_another_parent_gets_its_own_text(tmp_path):
    model = tiny_llama()
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert model_digest(model) != model_digest(other)
    mine, theirs = _rows(tmp_path, model), _rows(tmp_path, other)
    assert len(list((tmp_path / "selftext").iterdir())) == 2
    assert not torch.equal(mine, theirs)


SMALL = ["--seq-len", "32", "--eval-tokens", "128", "--calib-tokens", "128", "--device", "cpu"]
SMALL += ["--self-tokens", "512", "--no-progress"]


def test_family_and_decompose_take_data_self(tmp_path, tiny_model_dir, corpus_dir, capsys):
    """``--data self`` alone trains a family and calibrates a decomposition on text the parent
    wrote; mixed with a corpus it adds to it; the second command reads the first's cache."""
    from plrd.cli.entry import main

    model = ["--model", str(tiny_model_dir)]
    family = ["family", *model, "--sizes", "0.9", "--tokens-per-stage", "64", "--batch-size", "2"]
    assert main([*family, "--data", "self", "--out", str(tmp_path / "fam"), *SMALL]) == 0
    record = (tmp_path / "fam" / "family.json").read_text()
    assert '"self_text"' in record and '"members"' in record
    cached = sorted((Path(os.environ["PLRD_CACHE"]) / "selftext").rglob("chunk-*"))
    assert cached
    mixed = ["--data", "self", str(corpus_dir)]
    assert main([*family, *mixed, "--out", str(tmp_path / "mixed"), *SMALL]) == 0
    out = tmp_path / "member"
    argv = ["decompose", *model, "--size", "0.9", "--data", "self", "--out", str(out), *SMALL]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "plrd.json").is_file() and "held-out ppl" in capsys.readouterr().out
    assert sorted((Path(os.environ["PLRD_CACHE"]) / "selftext").rglob("chunk-*")) == cached


def test_the_default_data_is_self_and_eval_writes_no_training_text(
    tmp_path, tiny_model_dir, corpus_dir, capsys
):
    """With no ``--data`` a family trains on the parent's own text; ``pydoc`` names Python's help
    pages; ``plrd eval`` re-measures the family without writing training text, and with
    ``--eval-data`` measures held-out ppl on the parent's held-out text, general ppl on the
    named text."""
    import json
    import re
    import shutil

    from plrd.cli.entry import main
    from plrd.family.config import FamilyConfig
    from plrd.family.run_data import read_text_documents
    from plrd.family.sources import default_documents

    assert FamilyConfig().data == ("self",)
    assert read_text_documents(FamilyConfig.of(data=("self", "pydoc"))) == default_documents()
    assert read_text_documents(FamilyConfig.of(data=("self",))) == []

    out = tmp_path / "fam"
    family = ["family", "--model", str(tiny_model_dir), "--sizes", "0.9", "--out", str(out)]
    assert main([*family, "--tokens-per-stage", "64", "--batch-size", "2", *SMALL]) == 0
    record = json.loads((out / "family.json").read_text())
    assert record["corpus"]["data"] == ["self"]
    assert record["corpus"]["self_text"]["tokens"] >= 512
    for folder in (Path(os.environ["PLRD_CACHE"]) / "selftext").glob("*-train"):
        shutil.rmtree(folder)
    capsys.readouterr()
    evaluate = ["eval", str(out), "--device", "cpu", "--no-progress"]
    assert main([*evaluate, "--eval-data", str(corpus_dir)]) == 0
    assert not list((Path(os.environ["PLRD_CACHE"]) / "selftext").glob("*-train"))
    parent = next(line for line in capsys.readouterr().out.splitlines() if "parent:" in line)
    held_out, general = re.search(r"held-out ppl ([\d.]+).*general ppl ([\d.]+)", parent).groups()
    assert held_out == f"{record['parent']['held_out_ppl']:.2f}" and held_out != general
