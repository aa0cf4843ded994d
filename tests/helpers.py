"""Helpers shared by the test files: model state snapshots, logits, decomposed tiny models,
checkpoint listings, and running the ``plrd`` command for a one-line error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import plrd
from plrd.io.hf import CONFIG_FILE, GENERATION_CONFIG_FILE
from tests.tiny_models import tiny_llama, token_batches

HF_CONFIG_FILES = {CONFIG_FILE, GENERATION_CONFIG_FILE}
"""What ``plrd.save`` writes beside the checkpoint for a Hugging Face model."""


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` (cloned tensors) to compare against later."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """True when ``model`` has exactly the tensors of the snapshot ``before`` (names, values)."""
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def logits(model: nn.Module, batch: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits on ``batch`` (default: one fixed token batch [2, 16]), no grad."""
    if batch is None:
        batch = token_batches(count=1)[0]
    with torch.no_grad():
        return model(batch).logits


def decomposed(build: Callable[[], nn.Module] = tiny_llama, keep: float = 0.6) -> nn.Module:
    """A tiny model decomposed to ``keep`` with plain SVD (no calibration needed)."""
    model = build()
    plrd.decompose(model, keep, method="svd", progress=False)
    return model


def written(directory: Path) -> list[str]:
    """Files in a checkpoint directory besides the Hugging Face config plrd.save adds."""
    return sorted(p.name for p in directory.iterdir() if p.name not in HF_CONFIG_FILES)


def one_line_error(capsys, argv: list[str], *needles: str, code: int = 2) -> str:
    """Run ``plrd ARGV``: it must exit with ``code`` (default: the usage status) and print
    exactly one line on stderr, ``plrd ...``, no traceback, holding every needle. Returns that
    line."""
    from plrd.cli.entry import main  # only the tests that run the command need it

    capsys.readouterr()
    returned = main(argv)
    err = capsys.readouterr().err
    assert returned == code, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(("plrd ", "plrd:"))
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def family_argv(
    model: Path,
    data: Path,
    out: Path,
    *,
    seq_len: int,
    tokens_per_stage: int,
    batch_size: int,
    eval_tokens: int,
    calib_tokens: int,
    checkpoint_every: int,
) -> list[str]:
    """argv of a small CPU ``plrd family`` run: sizes 0.9,0.8, objective lm+kd, lr 3e-3,
    held-out fraction 0.2, no progress bars."""
    return [
        "family",
        *("--model", str(model), "--data", str(data), "--out", str(out)),
        *("--sizes", "0.9,0.8", "--tokens-per-stage", str(tokens_per_stage)),
        *("--batch-size", str(batch_size), "--seq-len", str(seq_len), "--objective", "lm+kd"),
        *("--lr", "3e-3", "--eval-tokens", str(eval_tokens), "--calib-tokens", str(calib_tokens)),
        *("--held-out-fraction", "0.2", "--checkpoint-every", str(checkpoint_every)),
        *("--device", "cpu", "--no-progress"),
    ]
