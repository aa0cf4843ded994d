"""Where a family runs: the device a ``device`` setting names, and autocast there."""

from __future__ import annotations

import contextlib

import torch

from plrd.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; any other torch device name as given, refused
    when it is not one or when CUDA is asked for and absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            "device", f"{device!r} is not a torch device (auto, cpu, cuda, cuda:0)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device", f"{device}: CUDA is not available on this machine; use cpu or auto"
        )
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere (fp32 on CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
