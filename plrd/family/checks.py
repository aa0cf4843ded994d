"""Checks that run once, before any model work: a family or a one-off decomposition stops here
on input that cannot work, with one message naming the value and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from plrd.core.budget import smallest_fraction
from plrd.core.targets import find_targets, linear_layers
from plrd.errors import ConfigError, InputError
from plrd.family.config import FamilyConfig
from plrd.family.device import resolve_device
from plrd.family.run_data import read_text_documents
from plrd.family.sources import expand_paths
from plrd.io.atomic import check_writable_dir
from plrd.io.models import ALIASES, find_smollm2_gguf, resolve_model


def check_model_source(name: str) -> None:
    """The model ``name`` can be found and its config loads (a hub id needs the network or the
    local cache); the default model needs its package."""
    if name.strip().lower() in ALIASES:
        find_smollm2_gguf()
        return
    resolved = resolve_model(name)
    from transformers import AutoConfig  # heavy: only when a model is named

    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            "model",
            f"{name} cannot be loaded ({reason}); pass a Hugging Face model directory, a "
            "cached hub id, or smollm2-135m",
        ) from None


def check_inputs(cfg: FamilyConfig, out: str | None) -> tuple[list[str], torch.device]:
    """Read the text corpus, check the general set's paths, find the model, resolve the device
    and try the output directory, in that order (the cheapest first); returns
    ``(text documents, device)`` for the run to use."""
    documents = read_text_documents(cfg)
    if cfg.eval_data:
        expand_paths(cfg.eval_data)
    check_model_source(cfg.model)
    resolved = resolve_device(cfg.device)
    if out is not None:
        check_writable_dir(out, option="out")
    return documents, resolved


def check_model(
    model: torch.nn.Module, name: str, sizes: Sequence[float] = (), seq_len: int | None = None
) -> None:
    """Refuse a model plrd cannot shrink: one with no targetable linear layer, with NaN/inf
    weights, whose context is shorter than ``seq_len``, or too small to reach the smallest of
    ``sizes`` (fractions of its parameters) even at rank 1 in every targeted layer."""
    try:
        find_targets(model)
    except ValueError:
        found = ", ".join(linear_layers(model)) or "none"
        raise InputError(
            f"model {name}: {type(model).__name__} has no linear layer plrd can factor "
            f"(linear layers: {found}; output heads and layers tied to embeddings are kept "
            "dense); pass a model with nn.Linear or Conv1D layers"
        ) from None
    for pname, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise InputError(
                f"model {name}: parameter {pname} holds NaN or inf values; the weights are "
                "damaged: restore them or pass another model"
            )
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if seq_len is not None and isinstance(context, int) and seq_len > context:
        raise ConfigError(
            "seq_len",
            f"{seq_len} is longer than the context of model {name} ({context} positions); "
            f"use {context} or less",
        )
    if sizes and min(sizes) < (smallest := smallest_fraction(model)):
        raise InputError(
            f"size {min(sizes):g} is out of reach for model {name}: even at rank 1 in every "
            f"targeted layer it keeps {smallest:.3f} of its parameters; choose a size above "
            f"{smallest:.3f}"
        )
