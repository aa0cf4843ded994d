"""What a stage minimises, per predicted token, averaged:

lm      cross-entropy of the next token, −log p_s(x[t+1] | x[≤t])
kd      τ² · KL(p_t^τ ‖ p_s^τ) to the teacher (the parent), softmax at temperature τ
lm+kd   (1 − α)·lm + α·kd
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from plrd.errors import InputError
from plrd.family.config import TrainConfig
from plrd.family.evaluate import next_token_nll


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)); logits [B, T, V]."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def objective_loss(
    logits: Tensor,
    input_ids: Tensor,
    cfg: TrainConfig,
    teacher_logits: Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of ``cfg.objective`` on logits [B, T, V] of input_ids [B, T], and its parts
    (floats) for logging."""
    parts: dict[str, float] = {}
    lm = kd = None
    if cfg.objective in ("lm", "lm+kd"):
        lm = next_token_nll(logits, input_ids, reduction="mean")
        parts["lm"] = float(lm.detach())
    if cfg.objective in ("kd", "lm+kd"):
        if teacher_logits is None:
            raise InputError(f"objective {cfg.objective!r} needs a teacher model")
        kd = kd_loss(logits, teacher_logits, cfg.kd_temperature)
        parts["kd"] = float(kd.detach())
    if lm is not None and kd is not None:
        loss = (1.0 - cfg.kd_alpha) * lm + cfg.kd_alpha * kd
    else:
        loss = lm if lm is not None else kd
    return loss, parts
