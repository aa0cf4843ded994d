"""Held-out perplexity and inference throughput of a causal LM.

Perplexity over blocks x [N, T] is exp of the mean next-token negative log-likelihood over all
N·(T−1) predicted positions: ppl = exp(−(1/N(T−1)) Σₙ Σₜ log p(x[n,t+1] | x[n,≤t])).
Throughput is the number of tokens run through the forward pass per second of wall time.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class EvalResult:
    """``ppl`` = exp(``nll``); ``tokens`` forwarded in ``seconds`` → ``tokens_per_s``."""

    ppl: float
    nll: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere (fp32 on CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_token_nll(logits: Tensor, input_ids: Tensor, reduction: str = "sum") -> Tensor:
    """Σ (or mean) of −log p(x[t+1] | x[≤t]); logits [B, T, V], input_ids [B, T]."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        input_ids[:, 1:].reshape(-1),
        reduction=reduction,
    )


@torch.inference_mode()
def evaluate(model: torch.nn.Module, blocks: Tensor, batch_size: int = 4) -> EvalResult:
    """Held-out perplexity of ``model`` on ``blocks`` [N, T] and its forward tokens/s."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be [N, T] with T >= 2, got {tuple(blocks.shape)}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    count = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with autocast_for(device):
            logits = model(input_ids=batch, use_cache=False).logits
        total_nll += float(next_token_nll(logits, batch))
        count += batch.shape[0] * (batch.shape[1] - 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    nll = total_nll / count
    return EvalResult(
        ppl=math.exp(min(nll, 700.0)), nll=nll, tokens=blocks.numel(), seconds=seconds
    )


def evaluate_sharded(model: torch.nn.Module, blocks: Tensor, batch_size: int = 4) -> EvalResult:
    """``evaluate`` split over the data-parallel ranks (``plrd.distributed``).

    Each rank evaluates rows rank, rank + W, ... of ``blocks``; the NLL sums, predicted-token
    counts and tokens are summed over the ranks, and ``seconds`` is the slowest rank's, so every
    rank returns the same perplexity and the aggregate tokens/s. One process: ``evaluate``.
    """
    from plrd import distributed

    if not distributed.is_distributed():
        return evaluate(model, blocks, batch_size)
    mine = distributed.shard(blocks)
    totals = torch.zeros(3, dtype=torch.float64)
    seconds = torch.zeros(1, dtype=torch.float64)
    if len(mine):
        r = evaluate(model, mine, batch_size)
        count = mine.shape[0] * (mine.shape[1] - 1)
        totals += torch.tensor([r.nll * count, count, r.tokens], dtype=torch.float64)
        seconds[0] = r.seconds
    device = model_device(model)
    totals = distributed.all_reduce(totals.to(device)).cpu()
    seconds = distributed.all_reduce(seconds.to(device), op="max").cpu()
    nll = float(totals[0] / totals[1])
    return EvalResult(
        ppl=math.exp(min(nll, 700.0)), nll=nll, tokens=int(totals[2]), seconds=float(seconds[0])
    )
