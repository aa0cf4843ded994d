"""Training faults: a non-finite loss or gradient skips the step; too many in a row stop the stage
with one clear message and keep the last good checkpoint, from which the same command resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import plrd.family.trainer as trainer_mod
from plrd.errors import TrainingDiverged
from plrd.family.config import TrainConfig
from plrd.family.train_state import checkpoint_dir, has_checkpoint, read_state
from tests.family.training import train_stage
from tests.tiny_models import VOCAB, tiny_llama


def _blocks(n=16, t=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def _poison_steps(monkeypatch, bad: set[int]):
    """Make the loss NaN on the 1-based optimizer steps in ``bad`` (one micro-batch per step)."""
    original = trainer_mod.objective_loss
    calls = []

    def poisoned(logits, input_ids, cfg, teacher_logits):
        calls.append(1)
        loss, parts = original(logits, input_ids, cfg, teacher_logits)
        if len(calls) in bad:
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(trainer_mod, "objective_loss", poisoned)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cfg(steps, **kw):
    kw.setdefault("checkpoint_every", 2)
    return TrainConfig(tokens_per_stage=steps * 2 * 16, batch_size=2, lr=1e-3, objective="lm", **kw)


def test_non_finite_steps_are_skipped(monkeypatch, tmp_path):
    _poison_steps(monkeypatch, {2, 3})
    model = tiny_llama()
    seen = {}
    train_stage(
        model, _blocks(), _cfg(5), tmp_path, on_step=lambda s: seen.update({s: _params(model)})
    )
    log = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in log] == [False, True, True, False, False]
    assert log[1]["loss"] is None  # NaN is not written as JSON
    # the skipped steps left every weight as it was; the good ones moved them
    for name in seen[1]:
        assert torch.equal(seen[1][name], seen[3][name]), name
    assert any(not torch.equal(seen[3][n], seen[4][n]) for n in seen[3])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_too_many_bad_steps_stop_and_keep_the_last_good_checkpoint(monkeypatch, tmp_path):
    _poison_steps(monkeypatch, set(range(3, 100)))
    model = tiny_llama()
    after_two = {}

    def remember(step):
        if step == 2:
            after_two.update(_params(model))

    with pytest.raises(TrainingDiverged) as info:
        train_stage(model, _blocks(), _cfg(10, max_bad_steps=2), tmp_path, on_step=remember)
    message = str(info.value)
    assert "step 5 of 10" in message and "3 steps in a row" in message
    assert "(step 4)" in message and str(checkpoint_dir(tmp_path)) in message
    assert len(message.splitlines()) == 1
    state = read_state(checkpoint_dir(tmp_path))
    assert state["step"] == 4 and state["bad_in_row"] == 2
    from plrd.io.checkpoint import load

    kept = load(checkpoint_dir(tmp_path), tiny_llama())
    for name, p in kept.named_parameters():
        assert torch.equal(p, after_two[name]), name  # the skipped steps 3-4 changed nothing


def test_zero_bad_steps_allowed_stops_at_the_first(monkeypatch, tmp_path):
    _poison_steps(monkeypatch, {1})
    with pytest.raises(TrainingDiverged, match="1 steps in a row"):
        train_stage(tiny_llama(), _blocks(), _cfg(3, max_bad_steps=0), tmp_path)
    state = read_state(checkpoint_dir(tmp_path))
    assert state["step"] == 0


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = tiny_llama()

    def break_weights(step):
        if step == 1:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.fill_(float("inf"))

    cfg = _cfg(4, max_bad_steps=10)
    with pytest.raises(TrainingDiverged, match="down_proj.weight holds NaN or inf"):
        train_stage(model, _blocks(), cfg, tmp_path, on_step=break_weights)
    assert has_checkpoint(tmp_path)
    state = read_state(checkpoint_dir(tmp_path))
    assert state["step"] == 0


def test_cli_stops_with_one_line_and_resumes(monkeypatch, capsys, tmp_path):
    """``plrd family`` on poisoned losses: exit 1, one line naming the flag and the checkpoint;
    the same command without the poison resumes from that checkpoint and finishes."""
    from plrd.cli.entry import EXIT_FAILURE, main
    from tests.tiny_family import SEQ, build_model_dir, fixture_documents

    docs = fixture_documents()
    model_dir = build_model_dir(tmp_path / "model", docs)
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(docs))
    out = tmp_path / "fam"
    argv = [
        "family",
        *("--model", str(model_dir), "--data", str(data), "--out", str(out)),
        *("--sizes", "0.9", "--tokens-per-stage", str(6 * 2 * SEQ), "--batch-size", "2"),
        *("--seq-len", str(SEQ), "--eval-tokens", str(4 * SEQ), "--calib-tokens", str(4 * SEQ)),
        *("--held-out-fraction", "0.2", "--checkpoint-every", "2", "--device", "cpu"),
        *("--no-progress", "--max-bad-steps", "1"),
    ]
    _poison_steps(monkeypatch, set(range(4, 100)))
    capsys.readouterr()
    assert main(argv) == EXIT_FAILURE
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("plrd family: error: members/size-0.90: training stopped at step 5")
    assert "last good checkpoint (step 4)" in err[0]
    assert json.loads((out / "family.json").read_text())["members"] == []

    monkeypatch.undo()
    assert main(argv) == 0
    assert "resuming" in capsys.readouterr().out
    member = json.loads((out / "family.json").read_text())["members"][0]
    assert member["tokens"] == 6 * 2 * SEQ and math.isfinite(member["held_out_ppl"])
    log = (out / "stages" / "size-0.90" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == list(range(1, 7))
