"""What a family trains and measures on.

- Training blocks: the training side of the text corpus (the files ``data`` names, and
  Python's help pages when it names ``pydoc``), plus the parent's own text when ``data``
  includes ``self`` (``plrd.family.selftext``).
- Held-out blocks (``held_out_ppl``): the held-out side of the text corpus; with ``data = self``
  alone, held-out text written by the parent.
- General blocks (``general_ppl``, ``kl_to_parent``): ``eval_data`` when given — text never
  trained on — else held-out text written by the parent (another seed stream than the
  training text, so never trained on either).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from plrd.errors import InputError
from plrd.family.config import FamilyConfig
from plrd.family.data import Corpus, build_corpus, pack, separator_id, tokenize_documents
from plrd.family.selftext import SelfText, model_digest, row_documents
from plrd.family.sources import default_documents, load_documents
from plrd.io.models import cache_dir

SELF = "self"
PYDOC = "pydoc"
"""``--data`` names that are not paths: the parent's own text, and the corpus that ships with
Python (``plrd.family.sources.default_documents``)."""
KEYWORDS = (SELF, PYDOC)


@dataclass
class RunData:
    corpus: Corpus
    general: Tensor
    general_source: str
    self_text: dict | None = None  # what was generated: parent digest, seed, rows


def text_paths(data: Sequence[str]) -> tuple[str, ...]:
    return tuple(p for p in data if p not in KEYWORDS)


def uses_self(data: Sequence[str]) -> bool:
    return SELF in data


def read_text_documents(cfg: FamilyConfig) -> list[str]:
    """The text corpus of ``cfg.data``: the Python help pages when it names ``pydoc`` (or is
    empty), then its paths' documents; none when it is ``self`` alone."""
    paths = text_paths(cfg.data)
    documents = default_documents() if PYDOC in cfg.data or not cfg.data else []
    if paths:
        documents += load_documents(paths, cfg.text_column)
    return documents


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _self_rows(
    cfg: FamilyConfig, parent: torch.nn.Module, tokenizer: Any, split: str, rows: int
) -> Tensor:
    source = SelfText(cache_dir(), model_digest(parent), cfg.seed, cfg.seq_len, split)
    bar = None
    if cfg.progress:
        bar = tqdm(desc=f"parent writes {split} text", unit="chunk", dynamic_ncols=True)

    def report(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        return source.rows(
            parent, rows, _special_ids(tokenizer), separator_id(tokenizer), on_chunk=report
        )
    finally:
        if bar is not None:
            bar.close()


def _self_blocks(cfg: FamilyConfig, parent, tokenizer, split: str, tokens: int) -> Tensor:
    """At least ``tokens`` tokens of parent-written text packed into blocks: samples end at
    the parent's end-of-text, so more rows than ``tokens / seq_len`` may be needed (the cache
    keeps the ones made, so asking again only adds the missing ones)."""
    sep = separator_id(tokenizer)
    needed = -(-tokens // cfg.seq_len)
    rows = needed
    while True:
        blocks = pack(
            row_documents(_self_rows(cfg, parent, tokenizer, split, rows), sep), cfg.seq_len, sep
        )
        if len(blocks) >= needed:
            return blocks
        rows += needed - len(blocks) + 1


def general_blocks(
    cfg: FamilyConfig, parent: torch.nn.Module, tokenizer: Any
) -> tuple[Tensor, str]:
    """The general set: ``eval_data`` (all of it is held out, the first ``eval_tokens``) or
    held-out text written by the parent; and a description of it."""
    if cfg.eval_data:
        docs = load_documents(cfg.eval_data, cfg.text_column)
        blocks = pack(tokenize_documents(docs, tokenizer), cfg.seq_len, separator_id(tokenizer))
        if len(blocks) == 0:
            raise InputError(
                f"eval_data holds fewer than {cfg.seq_len} tokens; add text or lower seq_len"
            )
        n = max(1, min(len(blocks), cfg.eval_tokens // cfg.seq_len))
        return blocks[:n], f"eval data: {', '.join(cfg.eval_data)}"
    blocks = _self_blocks(cfg, parent, tokenizer, "held-out", cfg.eval_tokens)
    n = max(1, min(len(blocks), cfg.eval_tokens // cfg.seq_len))
    return blocks[:n], "held-out text written by the parent"


def text_corpus(cfg: FamilyConfig, text_documents: Sequence[str], tokenizer: Any) -> Corpus | None:
    """The text corpus split and packed (None for ``data = self`` alone): built before the
    parent is loaded, so a corpus too short for the blocks stops the run first."""
    if not text_documents:
        return None
    return build_corpus(text_documents, tokenizer, cfg.seq_len, cfg.held_out_fraction)


def assemble(
    cfg: FamilyConfig,
    corpus: Corpus | None,
    parent: torch.nn.Module,
    tokenizer: Any,
    train_text: bool = True,
) -> RunData:
    """The run's data: ``corpus`` with the parent's own text added when ``data`` includes
    ``self``, and the general set. Without ``train_text`` (evaluation) the parent's training
    text is not written: the corpus keeps only the fingerprint it would have."""
    general, source = general_blocks(cfg, parent, tokenizer)
    self_text = None
    if uses_self(cfg.data):
        digest = model_digest(parent)
        train = None
        if train_text:
            train = _self_blocks(cfg, parent, tokenizer, "train", cfg.self_tokens)
            self_text = {"parent_digest": digest, "seed": cfg.seed, "tokens": int(train.numel())}
        held_out = general
        if corpus is None and cfg.eval_data:  # the parent's held-out text, not the eval data
            held_out = _self_blocks(cfg, parent, tokenizer, "held-out", cfg.eval_tokens)
        corpus = _with_self_text(corpus, train, held_out, digest, cfg)
    return RunData(corpus=corpus, general=general, general_source=source, self_text=self_text)


def _with_self_text(
    corpus: Corpus | None, train: Tensor | None, held_out: Tensor, digest: str, cfg: FamilyConfig
) -> Corpus:
    """``corpus`` with the parent's training text added; for self text alone, a corpus of it
    whose held-out side is ``held_out`` (the parent's held-out text)."""
    tag = hashlib.sha256(f"{digest}|{cfg.seed}|{cfg.self_tokens}".encode())
    if train is None:  # evaluation: the same fingerprint, no training text
        train = held_out[:0]
    if corpus is None:
        return Corpus(
            train=train,
            held_out=held_out,
            train_docs=len(train),
            held_out_docs=len(held_out),
            train_tokens=int(train.numel()),
            held_out_tokens=int(held_out.numel()),
            fingerprint=tag.hexdigest()[:16],
        )
    tag.update(corpus.fingerprint.encode())
    return replace(
        corpus,
        train=torch.cat([corpus.train, train]),
        train_docs=corpus.train_docs + len(train),
        train_tokens=corpus.train_tokens + int(train.numel()),
        fingerprint=tag.hexdigest()[:16],
    )
