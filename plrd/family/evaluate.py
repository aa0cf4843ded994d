"""Held-out perplexity and inference throughput of a causal LM.

Perplexity over blocks x [N, T] is exp of the mean next-token negative log-likelihood over all
N·(T−1) predicted positions: ppl = exp(−(1/N(T−1)) Σₙ Σₜ log p(x[n,t+1] | x[n,≤t])).
Throughput is the number of tokens run through one forward pass of a batch per second of wall
time: the median of several timed passes after a warm-up, with the thread count recorded beside
it (a cold first pass pays one-time costs and would make the first model timed look slow).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plrd.errors import InputError
from plrd.family import distributed
from plrd.family.device import autocast_for, model_device

TIMING_REPEATS = 3


@dataclass
class EvalResult:
    """``ppl`` = exp(``nll``) over ``tokens`` held-out tokens; ``tokens_per_s`` is the forward
    throughput (median of timed repeats on one warm batch) with ``threads`` CPU threads."""

    ppl: float
    nll: float
    tokens: int
    tokens_per_s: float
    threads: int


def next_token_nll(logits: Tensor, input_ids: Tensor, reduction: str = "sum") -> Tensor:
    """Σ (or mean) of −log p(x[t+1] | x[≤t]); logits [B, T, V], input_ids [B, T]."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        input_ids[:, 1:].reshape(-1),
        reduction=reduction,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_throughput(
    model: torch.nn.Module, batch: Tensor, repeats: int = TIMING_REPEATS
) -> float:
    """Forward tokens per second on ``batch`` [B, T]: one untimed warm-up pass, then the median
    of ``repeats`` timed passes, so every model is timed the same way (warm, same batch, the
    current thread count)."""
    device = model_device(model)
    batch = batch.to(device)
    times = []
    for i in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        with autocast_for(device):
            model(input_ids=batch, use_cache=False)
        _synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return batch.numel() / seconds if seconds > 0 else float("inf")


@torch.inference_mode()
def held_out_nll(model: torch.nn.Module, blocks: Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood of ``model`` over ``blocks`` [N, T]."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise InputError(f"blocks must be [N, T] with T >= 2, got {tuple(blocks.shape)}")
    device = model_device(model)
    total_nll = 0.0
    count = 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with autocast_for(device):
            logits = model(input_ids=batch, use_cache=False).logits
        total_nll += float(next_token_nll(logits, batch))
        count += batch.shape[0] * (batch.shape[1] - 1)
    return total_nll / count


def evaluate(
    model: torch.nn.Module,
    blocks: Tensor,
    batch_size: int = 4,
    timing_repeats: int = TIMING_REPEATS,
) -> EvalResult:
    """Held-out perplexity of ``model`` on ``blocks`` [N, T] and its forward tokens/s on the
    first ``batch_size`` blocks (``forward_throughput``; skipped when ``timing_repeats`` is 0)."""
    was_training = model.training
    model.eval()
    try:
        nll = held_out_nll(model, blocks, batch_size)
        speed = (
            forward_throughput(model, blocks[:batch_size], timing_repeats)
            if timing_repeats > 0
            else float("nan")
        )
    finally:
        model.train(was_training)
    return EvalResult(
        ppl=math.exp(min(nll, 700.0)),
        nll=nll,
        tokens=blocks.numel(),
        tokens_per_s=speed,
        threads=torch.get_num_threads(),
    )


@dataclass
class GeneralResult:
    """Quality on general text: ``ppl`` = exp(``nll``) over its predicted tokens, and
    ``kl_to_parent``, the mean over its token positions of KL(p_parent ‖ p_model)."""

    ppl: float
    nll: float
    kl_to_parent: float
    tokens: int


def kl_sum(logits: Tensor, parent_logits: Tensor) -> Tensor:
    """Σ over positions of KL(softmax(parent) ‖ softmax(logits)); both [B, T, V]."""
    v = logits.shape[-1]
    log_q = F.log_softmax(logits.float().reshape(-1, v), dim=-1)
    log_p = F.log_softmax(parent_logits.float().reshape(-1, v), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


@torch.inference_mode()
def general_sums(
    model: torch.nn.Module, parent: torch.nn.Module, blocks: Tensor, batch_size: int = 4
) -> Tensor:
    """float64 [nll sum, predicted tokens, KL sum, positions] of ``model`` on ``blocks``."""
    device = model_device(model)
    sums = torch.zeros(4, dtype=torch.float64)
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size].to(device)
        with autocast_for(device):
            logits = model(input_ids=batch, use_cache=False).logits
            reference = (
                logits if parent is model else parent(input_ids=batch, use_cache=False).logits
            )
        b, t = batch.shape
        sums += torch.tensor(
            [
                float(next_token_nll(logits, batch)),
                b * (t - 1),
                float(kl_sum(logits, reference)),
                b * t,
            ],
            dtype=torch.float64,
        )
    return sums


def evaluate_general(
    model: torch.nn.Module, parent: torch.nn.Module, blocks: Tensor, batch_size: int = 4
) -> GeneralResult:
    """Perplexity and KL to the parent on general text ``blocks`` [N, T]; split over the
    data-parallel ranks when there are several (the sums are all-reduced)."""
    was_training = model.training
    model.eval()
    try:
        mine = distributed.shard(blocks) if distributed.is_distributed() else blocks
        sums = general_sums(model, parent, mine, batch_size) if len(mine) else torch.zeros(4)
    finally:
        model.train(was_training)
    if distributed.is_distributed():
        sums = distributed.all_reduce(sums.double().to(model_device(model))).cpu()
    nll = float(sums[0] / sums[1])
    return GeneralResult(
        ppl=math.exp(min(nll, 700.0)),
        nll=nll,
        kl_to_parent=float(sums[2] / sums[3]),
        tokens=int(blocks.numel()),
    )


def evaluate_sharded(
    model: torch.nn.Module,
    blocks: Tensor,
    batch_size: int = 4,
    timing_repeats: int = TIMING_REPEATS,
) -> EvalResult:
    """``evaluate`` split over the data-parallel ranks (``plrd.family.distributed``).

    Each rank evaluates rows rank, rank + W, ... of ``blocks``; the NLL sums, predicted-token
    counts and tokens are summed over the ranks, and so are the ranks' throughputs (each timed
    on its own first batch, all at once), so every rank returns the same figures. One process:
    ``evaluate``.
    """
    if not distributed.is_distributed():
        return evaluate(model, blocks, batch_size, timing_repeats)
    mine = distributed.shard(blocks)
    totals = torch.zeros(4, dtype=torch.float64)
    if len(mine):
        r = evaluate(model, mine, batch_size, timing_repeats)
        count = mine.shape[0] * (mine.shape[1] - 1)
        totals += torch.tensor([r.nll * count, count, r.tokens, r.tokens_per_s])
    device = model_device(model)
    totals = distributed.all_reduce(totals.to(device)).cpu()
    nll = float(totals[0] / totals[1])
    return EvalResult(
        ppl=math.exp(min(nll, 700.0)),
        nll=nll,
        tokens=int(totals[2]),
        tokens_per_s=float(totals[3]),
        threads=torch.get_num_threads(),
    )


def throughput_note(
    ev: EvalResult, batch_size: int, seq_len: int, device: torch.device, world: int = 1
) -> str:
    """What ``tokens_per_s`` means in family.json, with the thread count it was measured at."""
    where = f"{ev.threads} CPU threads" if device.type == "cpu" else device.type
    together = f", {world} processes together" if world > 1 else ""
    return (
        f"tokens_per_s: forward tokens per second on one batch of {batch_size} x {seq_len} "
        f"held-out tokens, median of timed passes after a warm-up, on {where}{together}"
    )
