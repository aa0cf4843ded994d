"""Data-parallel scale-out: ``torchrun --nproc_per_node 2 -m plrd family`` (gloo on CPU) builds
the family a single process builds with the same global batch; the helpers are the identity in
one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plrd.cli.entry import main
from plrd.family import distributed
from tests.helpers import family_argv
from tests.tiny_family import SEQ

ROOT = Path(__file__).resolve().parents[2]


def _argv(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return family_argv(
        model,
        data,
        out,
        seq_len=SEQ,
        tokens_per_stage=6 * 4 * SEQ,
        batch_size=batch_size,
        eval_tokens=8 * SEQ,
        calib_tokens=8 * SEQ,
        checkpoint_every=2,
    )


def test_helpers_are_the_identity_in_one_process():
    assert not distributed.launched() and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.arange(6.0).view(3, 2)
    assert distributed.shard(x) is x
    assert distributed.all_reduce(x) is x and torch.equal(x, torch.arange(6.0).view(3, 2))
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    grams = {"q": torch.eye(2), "k": torch.eye(2)}
    assert distributed.all_reduce_grams(grams) is grams
    distributed.same_on_all_ranks([1, 2], "ranks")
    assert distributed.on_main(lambda v: v + 1, 1) == 2
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net) is net
    assert distributed.init(torch.device("cpu")) == torch.device("cpu")


@pytest.fixture(scope="module")
def single(cli_inputs, tmp_path_factory):
    """The reference: one process, batch 4."""
    model, data = cli_inputs
    out = tmp_path_factory.mktemp("single") / "fam"
    torch.set_num_threads(1)
    assert main(_argv(model, data, out, batch_size=4)) == 0
    return out


# Each rank SIGKILLs itself in the middle of the 4th optimizer step of the first stage.
KILLED_MAIN = """
import os, signal, sys
import plrd.family.data
_next, calls = plrd.family.data.BlockStream.next_batch, []
def next_batch(self):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return _next(self)
plrd.family.data.BlockStream.next_batch = next_batch
from plrd.cli.entry import main
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(
    argv: list[str], script: Path | None = None, nproc: int = 2
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    target = [str(script)] if script is not None else ["-m", "plrd"]
    return subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", str(nproc), *target, *argv),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _compare(single: Path, other: Path, world: int) -> None:
    a = json.loads((single / "family.json").read_text())
    b = json.loads((other / "family.json").read_text())
    assert b["parent"]["held_out_ppl"] == pytest.approx(a["parent"]["held_out_ppl"], rel=1e-4)
    assert [m["size"] for m in b["members"]] == [0.9, 0.8]
    for x, y in zip(a["members"], b["members"], strict=True):
        assert (x["world_size"], y["world_size"]) == (1, world)
        assert y["params"] == x["params"] and y["tokens"] == x["tokens"]
        ranks_x = json.loads((single / x["path"] / "plrd.json").read_text())["layers"]
        ranks_y = json.loads((other / y["path"] / "plrd.json").read_text())["layers"]
        assert ranks_y == ranks_x
        for key in ("zero_shot_ppl", "held_out_ppl"):
            assert y[key] == pytest.approx(x[key], rel=1e-3), key


def test_torchrun_two_processes_match_one_process(cli_inputs, single, tmp_path):
    """2 gloo ranks × batch 2 against 1 process × batch 4: the same global batches, the same
    Grams (sharded calibration, all-reduced), hence the same ranks and parameter counts, and
    held-out perplexities equal up to floating-point reduction order."""
    model, data = cli_inputs
    ddp = tmp_path / "ddp"
    done = _torchrun(_argv(model, data, ddp, batch_size=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("family: ") == 1  # rank 0 alone prints
    assert done.stdout.count("held-out ppl") >= 2
    _compare(single, ddp, world=2)

    b = json.loads((ddp / "family.json").read_text())
    assert "2 processes" in b["throughput"]
    for y in b["members"]:
        steps = (ddp / "stages" / f"size-{y['size']:.2f}" / "train.jsonl").read_text()
        assert len(steps.splitlines()) == 6  # the token budget is global: 6 steps of 2 x 2
    # rank 0 alone wrote: one member directory per size, no stray temporaries
    assert sorted(p.name for p in (ddp / "members").iterdir()) == ["size-0.80", "size-0.90"]
    assert not [p for p in ddp.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_fsdp2_killed_mid_stage_resumes_to_the_same_family(cli_inputs, single, tmp_path):
    """``--parallel fsdp``: LowRankLinear factors sharded by FSDP2 over 2 gloo ranks; both ranks
    are SIGKILLed mid-stage, the same command resumes from the last checkpoint (full weights and
    full optimizer state, written by rank 0), and the family matches the single process."""
    model, data = cli_inputs
    out = tmp_path / "fsdp"
    argv = _argv(model, data, out, batch_size=2) + ["--parallel", "fsdp"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MAIN)
    killed = _torchrun(argv, script)
    assert killed.returncode != 0
    stage = out / "stages" / "size-0.90"
    assert [json.loads(x)["step"] for x in (stage / "train.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    state = json.loads((stage / "checkpoint" / "train_state.json").read_text())
    assert "__tuple__" in json.dumps(state["state"])  # readable JSON, no pickle

    done = _torchrun(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the interrupted stage" in done.stdout
    _compare(single, out, world=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)")
def test_fsdp2_on_gpus_matches_one_process(cli_inputs, single, tmp_path):
    """FSDP2 over NCCL with LowRankLinear on the GPU's Triton path: as many ranks as devices
    (up to 2; one device still runs fully_shard, NCCL and the fused kernels end to end)."""
    model, data = cli_inputs
    nproc = min(2, torch.cuda.device_count())
    out = tmp_path / "fsdp-gpu"
    argv = _argv(model, data, out, batch_size=4 // nproc) + ["--parallel", "fsdp"]
    argv[argv.index("--device") + 1] = "cuda"
    done = _torchrun(argv, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    b = json.loads((out / "family.json").read_text())
    a = json.loads((single / "family.json").read_text())
    for x, y in zip(a["members"], b["members"], strict=True):
        assert y["params"] == x["params"]
        assert y["held_out_ppl"] == pytest.approx(x["held_out_ppl"], rel=0.1)  # bf16 autocast
