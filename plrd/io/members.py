"""Members: saved decomposed models that load as working Hugging Face models.

A member directory is a ``plrd.save`` checkpoint (``model.safetensors`` + ``plrd.json``) of a
Hugging Face model, with its ``config.json``, its tokenizer, and ``member.json`` holding its
metrics (size, perplexity, ...). ``plrd family`` writes one per size; ``plrd decompose``
writes one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plrd.errors import InputError
from plrd.io.atomic import atomic_dir
from plrd.io.checkpoint import load, save, verify_checkpoint, weights_checksum
from plrd.io.hf import has_config, load_architecture
from plrd.io.info import INFO_FILE

MEMBER_FILE = "member.json"
"""A member's metrics, as given to :func:`save_member`."""


def is_member_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a saved member or checkpoint (``plrd.json``)."""
    return (Path(path) / INFO_FILE).is_file()


def save_member(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    metrics: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Save a member atomically: ``plrd.save`` weights + ``plrd.json``, HF config, tokenizer.

    ``metrics`` are written as ``member.json`` and ``files`` (name → text) beside it, inside a
    temporary directory renamed into place at the end, so a member directory that exists is
    complete (an existing one is replaced whole). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save(model, tmp)  # weights, plrd.json and the HF config
        tokenizer.save_pretrained(tmp)
        if metrics is not None:
            (tmp / MEMBER_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def verify_member(member_dir: str | os.PathLike, sha256: str | None = None) -> str:
    """The SHA-256 of the member's weights, after checking its files; raises otherwise.

    Checks ``plrd.json``, the structure, size and SHA-256 of ``model.safetensors`` against it
    (``plrd.io.checkpoint.verify_checkpoint``) and, when given, against ``sha256`` (what a
    family recorded for the member). Raises DamagedFileError naming the file that is missing,
    damaged or different (InputError when ``member_dir`` is no checkpoint at all).
    """
    info = verify_checkpoint(member_dir, sha256=sha256)
    record = info.get("weights")
    return record["sha256"] if record is not None else weights_checksum(member_dir)


def load_pretrained(
    member_dir: str | os.PathLike, device: str | torch.device | None = None
) -> nn.Module:
    """A saved member (or any ``plrd.save`` of a Hugging Face model) as a working model.

    Builds the dense architecture from the member's ``config.json``, then ``plrd.load`` swaps in
    the ``LowRankLinear`` layers recorded in ``plrd.json`` and loads the weights strictly.
    Returns the model in eval mode (fp32), on ``device`` if given; it ``generate()``s as usual.
    Raises InputError for a directory that is no checkpoint or holds no Hugging Face config,
    DamagedFileError for damaged or mismatched files.
    """
    member_dir = Path(member_dir)
    if not is_member_dir(member_dir):
        raise InputError(
            f"{member_dir} is not a plrd member directory (no {INFO_FILE}); pass a directory "
            "written by plrd.save, plrd family or plrd decompose"
        )
    if not has_config(member_dir):
        raise InputError(
            f"{member_dir} holds a plrd checkpoint of a model that is not a Hugging Face model "
            "(no config.json); build the model in Python and load the weights into it with "
            f"plrd.load({str(member_dir)!r}, model)"
        )
    model = load(member_dir, load_architecture(member_dir))
    if device is not None:
        model.to(device)
    return model.eval()
