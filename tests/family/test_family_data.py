"""Corpus reading, the document split, packing, and the resumable block stream."""

from __future__ import annotations

import json

import pytest
import torch

from plrd.family.data import BlockStream, build_corpus, pack
from plrd.family.sources import (
    default_documents,
    expand_paths,
    load_documents,
    split_paragraphs,
)


def test_default_corpus_is_python_help_text():
    docs = default_documents()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000


def test_reads_txt_md_jsonl_folders_and_globs(corpus_dir):
    by_folder = load_documents([str(corpus_dir)])
    by_glob = load_documents([str(corpus_dir / "*.txt"), str(corpus_dir / "*.md")])
    by_file = load_documents([str(corpus_dir / "more.jsonl")])
    assert len(by_file) == 8
    assert len(by_glob) >= 16
    assert len(by_folder) == len(by_glob) + len(by_file)
    # the same file named twice is read once
    assert len(load_documents([str(corpus_dir / "more.jsonl")] * 2)) == 8


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing", None, "does not exist"),
        ("notes.csv", "a,b\n1,2\n", "no column 'text'"),
        ("bad.jsonl", "{not json}\n", "not valid JSON"),
        ("notext.jsonl", json.dumps({"body": "x"}) + "\n", "'text' field"),
    ],
)
def test_bad_data_paths_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_documents([str(path)])


def test_empty_corpus_and_empty_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="empty"):
        load_documents([str(tmp_path / "empty.txt")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        expand_paths([str(tmp_path / "sub")])
    with pytest.raises(ValueError, match="matches no"):
        expand_paths([str(tmp_path / "*.nothing")])


def test_split_paragraphs_keeps_all_text_in_order():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(40))
    docs = split_paragraphs(text, doc_chars=300)
    assert len(docs) > 3
    assert "\n\n".join(docs) == text
    assert all(len(d) >= 150 for d in docs)


def test_pack_joins_with_separator_and_drops_the_tail():
    blocks = pack([[1, 2, 3], [4, 5]], block_size=3, sep=0)
    assert blocks.tolist() == [[1, 2, 3], [0, 4, 5]]


def test_split_is_by_document_deterministic_and_order_free(tiny_model_dir, corpus_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = load_documents([str(corpus_dir)])
    a = build_corpus(docs, tok, 32, held_out_fraction=0.2)
    b = build_corpus(list(reversed(docs)), tok, 32, held_out_fraction=0.2)
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    assert a.fingerprint == b.fingerprint
    assert a.train_docs + a.held_out_docs == len(docs) + a.split_documents
    assert abs(a.held_out_tokens / (a.train_tokens + a.held_out_tokens) - 0.2) < 0.01
    # no run of held-out tokens appears anywhere in the training stream (block boundaries of
    # the two sides need not line up, so compare token runs, not blocks)
    assert not _shared_runs(a.train, a.held_out, 32)  # shorter runs: shared boilerplate
    train_rows = {tuple(r) for r in a.train.tolist()}
    assert a.eval_blocks(64).shape == (2, 32)
    calib = a.calibration_blocks(96, seed=0)
    assert calib.shape == (3, 32)
    assert all(tuple(r) in train_rows for r in calib.tolist())


def test_corpus_shorter_than_two_blocks_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="fewer than two blocks"):
        build_corpus(["a short text"], tok, 256)


def test_block_stream_skip_equals_drawing():
    blocks = torch.arange(50).view(5, 10)
    drawn = BlockStream(blocks, batch_size=2, seed=3)
    for _ in range(4):  # 8 blocks: into the second epoch
        drawn.next_batch()
    skipped = BlockStream(blocks, batch_size=2, seed=3)
    skipped.skip(8)
    assert skipped.state_dict() == drawn.state_dict()
    assert torch.equal(skipped.next_batch(), drawn.next_batch())


def test_block_stream_resumes_exactly():
    blocks = torch.arange(70).view(7, 10)
    a = BlockStream(blocks, batch_size=3, seed=5)
    first = [a.next_batch() for _ in range(4)]  # crosses an epoch boundary
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(3)]
    b = BlockStream(blocks, batch_size=3, seed=5)
    b.load_state_dict(state)
    again = [b.next_batch() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(rest, again, strict=True))
    epoch0 = torch.cat(first)[:7, 0].tolist()
    assert sorted(epoch0) == list(range(0, 70, 10))  # each block once per epoch


def test_held_out_fraction_holds_with_few_long_documents(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = [" ".join(f"word{i}x{j}" for j in range(900)) for i in range(3)]
    corpus = build_corpus(docs, tok, 32, held_out_fraction=0.1)
    share = corpus.held_out_tokens / (corpus.train_tokens + corpus.held_out_tokens)
    assert abs(share - 0.1) < 0.005, share
    assert corpus.split_documents == 1
    assert "cut between the two" in corpus.summary()
    assert not _shared_runs(corpus.train, corpus.held_out, 12)


def _shared_runs(train: torch.Tensor, held: torch.Tensor, n: int) -> int:
    """How many runs of ``n`` consecutive held-out tokens also occur in the training stream."""
    stream = train.flatten().tolist()
    runs = {tuple(stream[i : i + n]) for i in range(len(stream) - n + 1)}
    held_stream = held.flatten().tolist()
    return sum(tuple(held_stream[i : i + n]) in runs for i in range(len(held_stream) - n + 1))
