"""The optimizer of a stage: AdamW over the trainable parameters (decay on matrices only), a
linear-warmup + cosine learning-rate schedule, and the embeddings left frozen by default."""

from __future__ import annotations

import math

import torch

from plrd.family.config import TrainConfig


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warmup over ``warmup`` steps,
    then cosine from 1 to ``min_ratio`` at step ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, each once: weight decay on matrices, none on vectors."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Stop training the token embeddings and the output head (tied or not).

    With Adam, every row of the output embedding moves by about ``lr`` per step, even the rows of
    tokens absent from the batch (the softmax gives them tiny gradients that Adam normalises), so
    a few thousand tokens of narrow text shift the logits of the whole vocabulary.
    """
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (β = 0.9, 0.95) and its schedule over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8
    )
    warmup = min(total_steps, max(1, round(cfg.warmup * total_steps))) if cfg.warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio)
    )
    return optimizer, scheduler
