"""A corpus: documents (``plrd.family.sources``) tokenized, split into training and held-out
sides, and packed into blocks; the stream of training batches.

The split is by DOCUMENT and does not depend on the seed: documents are ordered by the SHA-256
of their text and taken into the held-out set until it holds ``held_out_fraction`` of all
tokens. Each side is tokenized, joined with the EOS token between documents, and packed into
non-overlapping blocks of ``block_size`` tokens (the tail shorter than a block is dropped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from plrd.errors import InputError


def document_key(text: str) -> str:
    """Seed-independent sort key of a document (SHA-256 of its UTF-8 text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_documents(docs: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    if not docs:
        return []
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def separator_id(tokenizer: Any) -> int:
    """The token placed between packed documents: EOS, else BOS, else pad."""
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise InputError("the tokenizer defines no eos, bos or pad token to separate documents")


def pack(token_lists: Sequence[Sequence[int]], block_size: int, sep: int) -> Tensor:
    """Join documents (``sep`` after each), cut into blocks: LongTensor [N, block_size]."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(sep)
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


@dataclass
class Corpus:
    """A tokenized corpus split by document: ``train`` [N, T] and ``held_out`` [M, T] blocks."""

    train: Tensor
    held_out: Tensor
    train_docs: int
    held_out_docs: int
    train_tokens: int
    held_out_tokens: int
    fingerprint: str
    split_documents: int = 0  # documents cut between the two sides to keep the fraction

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])

    def eval_blocks(self, max_tokens: int | None) -> Tensor:
        """The first held-out blocks, at most ``max_tokens`` tokens (all when None)."""
        if max_tokens is None:
            return self.held_out
        n = max(1, min(len(self.held_out), max_tokens // self.block_size))
        return self.held_out[:n]

    def calibration_blocks(self, max_tokens: int, seed: int = 0) -> Tensor:
        """``max_tokens // T`` training blocks (at least one) picked by a seeded permutation."""
        n = max(1, min(len(self.train), max_tokens // self.block_size))
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=gen)[:n]
        return self.train[idx.sort().values]

    def summary(self) -> str:
        return (
            f"{self.train_docs} training documents ({self.train_tokens:,} tokens, "
            f"{len(self.train)} blocks of {self.block_size}); {self.held_out_docs} held-out "
            f"documents ({self.held_out_tokens:,} tokens, {len(self.held_out)} blocks)"
            + (
                f"; {self.split_documents} document cut between the two to hold out the "
                "asked fraction"
                if self.split_documents
                else ""
            )
        )


def build_corpus(
    docs: Sequence[str],
    tokenizer: Any,
    block_size: int,
    held_out_fraction: float = 0.1,
) -> Corpus:
    """Tokenize ``docs``, split them into train / held-out documents, pack each side.

    Raises InputError when a side would hold less than one block.
    """
    if block_size < 2:
        raise InputError(f"block size must be at least 2 tokens, got {block_size}")
    if not 0.0 < held_out_fraction < 1.0:
        raise InputError(f"held-out fraction must be in (0, 1), got {held_out_fraction}")
    if not docs:
        raise InputError("the corpus is empty: no documents")
    order = sorted(range(len(docs)), key=lambda i: document_key(docs[i]))
    ids = tokenize_documents([docs[i] for i in order], tokenizer)
    lengths = [len(x) + 1 for x in ids]
    total = sum(lengths)
    if total < 2 * block_size:
        raise InputError(
            f"the corpus has {total:,} tokens, fewer than two blocks of {block_size} "
            "(one to train on, one held out); add text with --data or lower --seq-len"
        )
    target = max(block_size, int(held_out_fraction * total))
    held, train, straddling = _split_by_tokens(ids, target)
    sep = separator_id(tokenizer)
    train_blocks = pack(train, block_size, sep)
    held_blocks = pack(held, block_size, sep)
    if len(train_blocks) == 0 or len(held_blocks) == 0:
        raise InputError(
            f"the corpus ({len(docs)} documents, {total:,} tokens) does not split into at least "
            f"one training and one held-out block of {block_size} tokens; add documents with "
            "--data or lower --seq-len"
        )
    digest = hashlib.sha256()
    for i in order:
        digest.update(document_key(docs[i]).encode())
    return Corpus(
        train=train_blocks,
        held_out=held_blocks,
        train_docs=len(train),
        held_out_docs=len(held),
        train_tokens=sum(len(x) + 1 for x in train),
        held_out_tokens=sum(len(x) + 1 for x in held),
        fingerprint=digest.hexdigest()[:16],
        split_documents=int(straddling),
    )


def _split_by_tokens(
    ids: Sequence[Sequence[int]], target: int
) -> tuple[list[Sequence[int]], list[Sequence[int]], bool]:
    """``(held, train, straddling)``: documents in order go to the held-out side until it holds
    ``target`` tokens (one separator counted per document); the document that would overshoot
    is cut there, its head held out and its tail trained on (``straddling`` is then True), so
    the held-out share is what was asked for even when there are few, long documents."""
    held: list[Sequence[int]] = []
    train: list[Sequence[int]] = []
    held_tokens = 0
    straddling = False
    for doc in ids:
        room = target - held_tokens
        if room <= 0:
            train.append(doc)
        elif len(doc) + 1 <= room:
            held.append(doc)
            held_tokens += len(doc) + 1
        else:
            held.append(doc[: room - 1])
            train.append(doc[room - 1 :])
            held_tokens = target
            straddling = True
    return held, train, straddling


class BlockStream:
    """Batches of training blocks in a seeded order, one shuffled pass (epoch) after another.

    The position ``(epoch, index)`` is the whole state, so a resumed run draws the same batches.
    """

    def __init__(self, blocks: Tensor, batch_size: int, seed: int) -> None:
        if len(blocks) == 0:
            raise InputError("no training blocks to draw batches from")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks), generator=gen)

    def next_batch(self) -> Tensor:
        """The next ``batch_size`` blocks [B, T], wrapping into a new epoch when needed."""
        rows = []
        while len(rows) < self.batch_size:
            if self.index >= len(self._perm):
                self.epoch += 1
                self.index = 0
                self._perm = self._permutation(self.epoch)
            rows.append(int(self._perm[self.index]))
            self.index += 1
        return self.blocks[rows]

    def skip(self, n: int) -> None:
        """Advance by ``n`` blocks (as if they had been drawn), across epochs if needed."""
        per_epoch = len(self.blocks)
        total = self.epoch * per_epoch + self.index + n
        epoch, self.index = divmod(total, per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._perm = self._permutation(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._perm = self._permutation(self.epoch)
