"""Validation of an exported graph against its PyTorch model, one prompt at a time (batch 1).

For each prompt of S tokens :func:`check_prompt` measures:

* ``logits_diff``: max |Δlogit| over all S positions and the vocabulary, one ONNX Runtime pass
  with an empty past against ``model(ids).logits``;
* ``logits_diff_cached``: the same, the prompt split into a prefix and the rest, the rest fed
  with the prefix's ``present`` as past (KV-cache reuse with more than one new token);
* greedy agreement: ``max_new_tokens`` tokens of ``model.generate(do_sample=False)`` against
  ``OnnxCausalLM.generate`` with cache reuse (one token per step) and without (the whole
  sequence recomputed each step). EOS does not stop either side, so all tokens are compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from plrd.deploy.errors import ExportError
from plrd.deploy.onnx_runtime import OnnxCausalLM

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
RANDOM_PROMPT_LENGTHS = (4, 9, 16)


@dataclass
class PromptCheck:
    """Figures for one prompt; tokens are the generated ids (prompt excluded)."""

    prompt_tokens: int
    logits_scale: float
    logits_diff: float
    logits_diff_cached: float
    torch_tokens: list[int]
    ort_tokens_cached: list[int]
    ort_tokens_uncached: list[int]

    @property
    def greedy_match_cached(self) -> bool:
        return self.ort_tokens_cached == self.torch_tokens

    @property
    def greedy_match_uncached(self) -> bool:
        return self.ort_tokens_uncached == self.torch_tokens

    def allowed(self, tolerance: float, rtol: float) -> float:
        """The largest |Δlogit| accepted: ``tolerance + rtol · max |logit|`` (PyTorch's)."""
        return tolerance + rtol * self.logits_scale

    def passed(self, tolerance: float, rtol: float = 0.0) -> bool:
        """Both logit differences within :meth:`allowed`, both greedy sequences PyTorch's."""
        close = max(self.logits_diff, self.logits_diff_cached) <= self.allowed(tolerance, rtol)
        return close and self.greedy_match_cached and self.greedy_match_uncached

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["greedy_match_cached"] = self.greedy_match_cached
        out["greedy_match_uncached"] = self.greedy_match_uncached
        return out

    @staticmethod
    def header() -> str:
        return (
            f"{'tokens':>6}  {'max|logit|':>10}  {'max|Δlogit|':>11}  {'cached':>9}"
            "  greedy (cache/no cache)"
        )

    def row(self) -> str:
        n = len(self.torch_tokens)
        matches = (self.greedy_match_cached, self.greedy_match_uncached)
        marks = ["=" if ok else "≠" for ok in matches]
        return (
            f"  {self.prompt_tokens:>6}  {self.logits_scale:>10.2f}  {self.logits_diff:>11.2e}"
            f"  {self.logits_diff_cached:>9.2e}"
            f"  {n} tokens {marks[0]} / {marks[1]}"
        )


def make_prompts(prompts: Sequence[Any] | None, tokenizer: Any, vocab: int) -> list[list[int]]:
    """Token-id prompts: strings are encoded with ``tokenizer``, id lists are kept as they are.

    ``None``: :data:`DEFAULT_PROMPTS` with a tokenizer, else seeded random ids of
    :data:`RANDOM_PROMPT_LENGTHS` tokens in ``range(vocab)``.
    """
    if prompts is None:
        if tokenizer is not None:
            prompts = DEFAULT_PROMPTS
        else:
            g = torch.Generator().manual_seed(0)
            lengths = RANDOM_PROMPT_LENGTHS
            return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ExportError(
                    f"prompt {prompt[:30]!r} is text but there is no tokenizer; pass token ids "
                    "or a tokenizer"
                )
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ExportError(f"prompt {ids[:8]} is empty or has ids outside 0..{vocab - 1}")
        out.append(ids)
    return out


def _torch_greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """``model.generate`` greedy, exactly ``max_new_tokens`` tokens (EOS does not stop it)."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"logits shapes differ: ONNX {a.shape}, PyTorch {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def check_prompt(
    model: nn.Module, runner: OnnxCausalLM, prompt: list[int], max_new_tokens: int
) -> PromptCheck:
    """Compare ``runner`` with ``model`` on one prompt (see the module docs)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits.float().numpy()
    array = ids.numpy()
    logits, _ = runner.forward(array)
    cut = max(1, len(prompt) // 2)
    if cut < len(prompt):
        first, present = runner.forward(array[:, :cut])
        rest, _ = runner.forward(array[:, cut:], past=present)
        cached = np.concatenate([first, rest], axis=1)
    else:
        cached = logits
    start = len(prompt)
    return PromptCheck(
        prompt_tokens=len(prompt),
        logits_scale=float(np.abs(reference).max()),
        logits_diff=_max_diff(logits, reference),
        logits_diff_cached=_max_diff(cached, reference),
        torch_tokens=_torch_greedy(model, ids, max_new_tokens),
        ort_tokens_cached=runner.generate(array, max_new_tokens)[0, start:].tolist(),
        ort_tokens_uncached=runner.generate(array, max_new_tokens, use_cache=False)[
            0, start:
        ].tolist(),
    )
