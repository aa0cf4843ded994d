"""Kill-and-resume: ``kill -9`` in the middle of a stage, then the same command again, gives the
family an uninterrupted run gives (same members, bit-identical weights on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plrd.cli.entry import EXIT_INTERRUPTED, main
from plrd.family.train_state import STATE, STATE_TENSORS, checkpoint_dir, read_state
from tests.helpers import family_argv
from tests.tiny_family import SEQ

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8  # per stage

# The killed runs are slowed down (a pause per batch) so that the kill lands mid-stage.
SLOW_MAIN = """
import sys, time
import plrd.family.data
_next = plrd.family.data.BlockStream.next_batch
def slow(self):
    time.sleep(0.05)
    return _next(self)
plrd.family.data.BlockStream.next_batch = slow
from plrd.cli.entry import main
sys.exit(main(sys.argv[1:]))
"""


def _argv(model: Path, data: Path, out: Path) -> list[str]:
    return family_argv(
        model,
        data,
        out,
        seq_len=SEQ,
        tokens_per_stage=STEPS * 2 * SEQ,
        batch_size=2,
        eval_tokens=4 * SEQ,
        calib_tokens=4 * SEQ,
        checkpoint_every=1,
    )


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _run_and_kill(argv: list[str], ready, timeout: float = 90.0) -> None:
    """Start ``plrd`` in a subprocess, SIGKILL it once ``ready()`` is true."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MAIN, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(
                    f"plrd ended (status {proc.returncode}) before the kill: "
                    f"{proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach the kill point in time")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _members(out: Path) -> list[dict]:
    drop = ("tokens_per_s", "seconds", "train_seconds", "sha256")
    doc = json.loads((out / "family.json").read_text())
    return [{k: v for k, v in m.items() if k not in drop} for m in doc["members"]]


def test_kill_9_mid_stage_then_rerun_gives_the_same_family(cli_inputs, tmp_path, capsys):
    model, data = cli_inputs
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main(_argv(model, data, ref)) == 0

    stage1 = out / "stages" / "size-0.90"
    stage2 = out / "stages" / "size-0.80"
    # 1st kill: in stage 1, after three steps
    _run_and_kill(_argv(model, data, out), lambda: _log_lines(stage1 / "train.jsonl") >= 3)
    assert not (out / "members" / "size-0.90").exists()
    assert (checkpoint_dir(stage1) / STATE).is_file()
    # 2nd kill: the rerun resumes stage 1, finishes it and is killed in stage 2
    _run_and_kill(_argv(model, data, out), lambda: _log_lines(stage2 / "train.jsonl") >= 2)
    assert [m["size"] for m in json.loads((out / "family.json").read_text())["members"]] == [0.9]

    capsys.readouterr()
    assert main(_argv(model, data, out)) == 0
    printed = capsys.readouterr().out
    assert "size-0.90: finished earlier, skipped" in printed
    assert "size-0.80: resuming the interrupted stage" in printed

    want, got = _members(ref), _members(out)
    assert [m["params"] for m in got] == [m["params"] for m in want]
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-6), key
            else:
                assert b[key] == a[key], key
        x = load_file(str(ref / a["path"] / "model.safetensors"))
        y = load_file(str(out / b["path"] / "model.safetensors"))
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), a["path"]  # bit-identical on CPU
    for stage in (stage1, stage2):
        steps = [json.loads(x)["step"] for x in (stage / "train.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        assert not checkpoint_dir(stage).exists()
    leftovers = [p for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers


def test_training_state_is_safetensors_and_json_only(cli_inputs, tmp_path):
    """No pickle anywhere in a checkpoint; a damaged state file is named on read."""
    model, data = cli_inputs
    out = tmp_path / "fam"
    argv = _argv(model, data, out)
    argv[argv.index("--sizes") + 1] = "0.9"
    argv[argv.index("--tokens-per-stage") + 1] = str(2 * 2 * SEQ)

    import plrd.family.trainer as trainer_mod

    original = trainer_mod.save_checkpoint
    saved = []

    def stop_after_first(*args, **kwargs):
        original(*args, **kwargs)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, right after a checkpoint

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_mod, "save_checkpoint", stop_after_first)
    try:
        assert main(argv) == EXIT_INTERRUPTED
    finally:
        mp.undo()
    ckpt = checkpoint_dir(out / "stages" / "size-0.90")
    names = sorted(p.name for p in ckpt.iterdir())
    assert set(names) >= {"model.safetensors", "plrd.json", STATE, STATE_TENSORS}
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    state = read_state(ckpt)
    assert state["step"] == 1 and isinstance(state["rng"]["python"], tuple)
    data_bytes = bytearray((ckpt / STATE_TENSORS).read_bytes())
    data_bytes[-3] ^= 1
    (ckpt / STATE_TENSORS).write_bytes(bytes(data_bytes))
    with pytest.raises(ValueError, match=STATE_TENSORS):
        read_state(ckpt)
