"""Text written by the parent itself (``--data self``), in the data-free manner of LLM-QAT.

Each sample starts from one token drawn uniformly from the vocabulary (special tokens excluded),
continues greedily for ``GREEDY_TOKENS`` tokens, then samples from the parent's distribution at
temperature 1 (no top-k/top-p) up to ``length`` tokens or its end-of-text token. Samples are
generated in chunks of ``chunk_rows`` rows, batched with the KV cache of ``generate``; chunk k
is seeded by (seed, k) alone, so any chunk is the same whenever it is made.

Chunks are cached on disk under
``<cache>/selftext/<parent digest>-seed<S>-len<L>-rows<R>-<split>/`` (R rows per chunk)
(safetensors, written atomically): a later stage or run asking for rows that exist reads them;
a killed generation resumes at the first missing chunk; another parent (other weights) has
another digest and so another directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from plrd.errors import InputError
from plrd.io.atomic import atomic_path

GREEDY_TOKENS = 3
# Rows generated together. Each decoding step reads every weight once for all rows, so wider
# chunks write faster (2 CPU threads, SmolLM2-135M: 60 tokens/s at 16 rows, 147 at 64); 32 rows
# of 256 tokens cover the default 4,096-token general set in one chunk.
CHUNK_ROWS = 32
SPLITS = ("train", "held-out")
CHUNK = "chunk-{:05d}.safetensors"


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _first_tokens(
    tokenizer_special: set[int], vocab: int, rows: int, gen: torch.Generator
) -> Tensor:
    allowed = torch.tensor([i for i in range(vocab) if i not in tokenizer_special])
    return allowed[torch.randint(0, len(allowed), (rows, 1), generator=gen)]


@torch.inference_mode()
def generate_rows(
    model: torch.nn.Module,
    rows: int,
    length: int,
    seed: int,
    special: set[int],
    eos: int,
) -> Tensor:
    """``rows`` samples [rows, length] (see the module docstring); after a row's end-of-text
    token the row holds ``eos`` to its end."""
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    first = _first_tokens(special, vocab, rows, gen).to(next(model.parameters()).device)
    from transformers import GenerationConfig  # heavy: only when generating

    greedy = GenerationConfig(
        max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=eos, eos_token_id=eos
    )
    sampled = GenerationConfig(
        max_new_tokens=length - 1 - GREEDY_TOKENS,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=eos,
        eos_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids = model.generate(first, attention_mask=torch.ones_like(first), generation_config=greedy)
        ids = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=sampled)
    out = torch.full((rows, length), eos, dtype=torch.long)
    out[:, : ids.shape[1]] = ids.cpu()
    return out


def row_documents(rows: Tensor, eos: int) -> list[list[int]]:
    """Each row up to (not including) its first end-of-text token: a document's token ids."""
    docs = []
    for row in rows.tolist():
        end = row.index(eos, 1) if eos in row[1:] else len(row)
        docs.append(row[:end])
    return docs


class SelfText:
    """The cached samples of one parent, seed, length and split (``train`` or ``held-out``)."""

    def __init__(
        self,
        cache: Path,
        digest: str,
        seed: int,
        length: int,
        split: str = "train",
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        self.directory = (
            Path(cache)
            / "selftext"
            / (f"{digest[:16]}-seed{seed}-len{length}-rows{chunk_rows}-{split}")
        )
        self.seed = seed + (0 if split == "train" else 7_919_000_003)
        self.length, self.chunk_rows = length, chunk_rows

    def chunk_path(self, index: int) -> Path:
        return self.directory / CHUNK.format(index)

    def cached_chunks(self) -> int:
        """How many chunks from the first are on disk."""
        n = 0
        while self.chunk_path(n).is_file():
            n += 1
        return n

    def rows(
        self,
        model: torch.nn.Module,
        count: int,
        special: set[int],
        eos: int,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """The first ``count`` rows [count, length]: read from the cache, the missing chunks
        generated and cached first. ``on_chunk(done, total)`` reports each chunk."""
        from safetensors.torch import load_file, save_file  # heavy: only when generating

        chunks = -(-count // self.chunk_rows)
        parts = []
        for index in range(chunks):
            path = self.chunk_path(index)
            if not path.is_file():
                rows = generate_rows(
                    model, self.chunk_rows, self.length, self.seed * 100_003 + index, special, eos
                )
                with atomic_path(path) as tmp:
                    save_file({"rows": rows}, str(tmp))
            try:
                parts.append(load_file(str(path))["rows"])
            except Exception:  # a damaged cache file: it is only a cache, make it again
                path.unlink()
                return self.rows(model, count, special, eos, on_chunk)
            if on_chunk is not None:
                on_chunk(index + 1, chunks)
        return torch.cat(parts)[:count]
