"""Running one training stage in tests: ``train_stage`` with no progress bar."""

from __future__ import annotations

from pathlib import Path

import torch

from plrd.family.config import TrainConfig
from plrd.family.trainer import Trainer, TrainResult


def train_stage(
    model: torch.nn.Module, blocks: torch.Tensor, cfg: TrainConfig, work_dir: Path, **kwargs
) -> TrainResult:
    return Trainer(model, blocks, cfg, work_dir, progress=False, **kwargs).run()
