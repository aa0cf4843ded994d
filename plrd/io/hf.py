"""Hugging Face architectures on disk: a config saved beside plrd weights, and a model built from
a config without weights (they are loaded next).

transformers is imported inside the functions that need it: importing it costs seconds, and
``plrd.save`` recognises a Hugging Face model by duck typing, so plain PyTorch models never pay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def save_config(model: nn.Module, directory: Path) -> None:
    """``config.json`` (and ``generation_config.json``) of a Hugging Face model, so that
    ``plrd.load_pretrained`` can rebuild its architecture; nothing for other models."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "save_pretrained", None)):
        return
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(directory)


def has_config(directory: Path) -> bool:
    """True when ``directory`` holds a Hugging Face ``config.json``."""
    return (directory / CONFIG_FILE).is_file()


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM of ``config``'s architecture with uninitialised weights (loaded next).

    Tied embeddings are tied (they share one storage), as ``from_pretrained`` would leave them.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; tied embeddings must share storage
    return model


def load_architecture(directory: Path) -> nn.Module:
    """An empty fp32 model built from ``directory``'s ``config.json``, with its generation
    config when one is saved there."""
    from transformers import AutoConfig, GenerationConfig

    model = empty_model(AutoConfig.from_pretrained(directory))
    if (directory / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model
