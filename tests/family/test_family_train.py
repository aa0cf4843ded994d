"""The stage training loop: schedule, objectives, learning, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plrd.family.config import TrainConfig
from plrd.family.objectives import kd_loss, objective_loss
from plrd.family.optimizer import lr_factor
from plrd.family.train_state import checkpoint_dir, has_checkpoint
from tests.family.training import train_stage


class Stop(Exception):
    pass


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, total=20, warmup=4, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[3:-1], f[4:], strict=True))
    assert lr_factor(20, 20, 4, 0.1) == pytest.approx(0.1)


def test_kd_loss_is_zero_for_the_teacher_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 11, generator=g)
    s = torch.randn(2, 5, 11, generator=g)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(s, t)) > 0.01
    # KL(p_t || p_s) by hand
    p = t.softmax(-1)
    ref = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    assert float(kd_loss(s, t)) == pytest.approx(float(ref), rel=1e-5)


def test_objectives_combine_lm_and_kd():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 6, 9, generator=g)
    teacher = torch.randn(1, 6, 9, generator=g)
    ids = torch.randint(0, 9, (1, 6), generator=g)
    lm, p_lm = objective_loss(logits, ids, TrainConfig(objective="lm"), None)
    kd, p_kd = objective_loss(logits, ids, TrainConfig(objective="kd"), teacher)
    both, parts = objective_loss(logits, ids, TrainConfig(objective="lm+kd"), teacher)
    assert float(both) == pytest.approx(0.5 * float(lm) + 0.5 * float(kd), rel=1e-6)
    assert parts == pytest.approx({"lm": p_lm["lm"], "kd": p_kd["kd"]})
    with pytest.raises(ValueError, match="teacher"):
        objective_loss(logits, ids, TrainConfig(objective="kd"), None)


def _tiny(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _blocks(model_dir, n=24, t=32):
    g = torch.Generator().manual_seed(0)
    vocab = _tiny(model_dir).config.vocab_size
    # a learnable pattern: each block counts upwards from a random start
    starts = torch.randint(0, vocab - t, (n, 1), generator=g)
    return starts + torch.arange(t)


def test_training_lowers_the_loss(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    blocks = _blocks(tiny_model_dir)
    cfg = TrainConfig(
        tokens_per_stage=12 * 4 * 32,
        batch_size=4,
        lr=3e-3,
        objective="lm",
        train_embeddings=True,
        checkpoint_every=0,
    )
    result = train_stage(model, blocks, cfg, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert result.tokens == 12 * 4 * 32 and result.steps == 12
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert all(math.isfinite(r["grad_norm"]) for r in log)


def test_embeddings_are_frozen_unless_asked(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    emb = model.get_input_embeddings().weight.detach().clone()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = TrainConfig(tokens_per_stage=2 * 2 * 32, batch_size=2, objective="lm", checkpoint_every=0)
    train_stage(model, _blocks(tiny_model_dir), cfg, tmp_path)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)


def test_interrupted_stage_resumes_to_identical_weights(tiny_model_dir, tmp_path):
    from plrd.io.checkpoint import load
    from plrd.io.hf import empty_model as _empty_model

    blocks = _blocks(tiny_model_dir)
    teacher = _tiny(tiny_model_dir)
    cfg = TrainConfig(
        tokens_per_stage=7 * 2 * 32,
        batch_size=2,
        lr=1e-3,
        objective="lm+kd",
        checkpoint_every=3,
    )

    straight = _tiny(tiny_model_dir)
    train_stage(straight, blocks, cfg, tmp_path / "a", teacher=teacher)

    def stop_at_5(step):
        if step == 5:
            raise Stop

    first = _tiny(tiny_model_dir)
    with pytest.raises(Stop):
        train_stage(first, blocks, cfg, tmp_path / "b", teacher=teacher, on_step=stop_at_5)
    assert has_checkpoint(tmp_path / "b")
    resumed = load(checkpoint_dir(tmp_path / "b"), _empty_model(first.config))
    train_stage(resumed, blocks, cfg, tmp_path / "b", teacher=teacher)

    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    log = [json.loads(x) for x in (tmp_path / "b" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))

    other = TrainConfig(tokens_per_stage=9 * 2 * 32, batch_size=2, checkpoint_every=3)
    with pytest.raises(ValueError, match="original settings"):
        train_stage(resumed, blocks, other, tmp_path / "b", teacher=teacher)
