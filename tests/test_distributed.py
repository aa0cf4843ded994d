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

from plrd import distributed
from plrd.cli import main
from tests.family.conftest import SEQ, build_model_dir, fixture_documents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    docs = fixture_documents()
    model = build_model_dir(root / "model", docs)
    data = root / "corpus.txt"
    data.write_text("\n\n".join(docs))
    return model, data


def _argv(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "family",
        *("--model", str(model), "--data", str(data), "--out", str(out)),
        *("--sizes", "0.9,0.8", "--tokens-per-stage", str(6 * 4 * SEQ)),
        *("--batch-size", str(batch_size), "--seq-len", str(SEQ), "--objective", "lm+kd"),
        *("--lr", "3e-3", "--eval-tokens", str(8 * SEQ), "--calib-tokens", str(8 * SEQ)),
        *("--held-out-fraction", "0.2", "--checkpoint-every", "2", "--device", "cpu"),
        "--no-progress",
    ]


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


def test_torchrun_two_processes_match_one_process(inputs, tmp_path, capsys):
    """2 gloo ranks × batch 2 against 1 process × batch 4: the same global batches, the same
    Grams (sharded calibration, all-reduced), hence the same ranks and parameter counts, and
    held-out perplexities equal up to floating-point reduction order."""
    model, data = inputs
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_argv(model, data, single, batch_size=4)) == 0
    capsys.readouterr()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", "2", "-m", "plrd"),
            *_argv(model, data, ddp, batch_size=2),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("family: ") == 1  # rank 0 alone prints
    assert done.stdout.count("held-out ppl") >= 2

    a = json.loads((single / "family.json").read_text())
    b = json.loads((ddp / "family.json").read_text())
    assert b["parent"]["held_out_ppl"] == pytest.approx(a["parent"]["held_out_ppl"], rel=1e-4)
    assert "2 processes" in b["throughput"]
    assert [m["size"] for m in b["members"]] == [0.9, 0.8]
    for x, y in zip(a["members"], b["members"], strict=True):
        assert (x["world_size"], y["world_size"]) == (1, 2)
        assert y["params"] == x["params"] and y["tokens"] == x["tokens"]
        ranks_x = json.loads((single / x["path"] / "plrd.json").read_text())["layers"]
        ranks_y = json.loads((ddp / y["path"] / "plrd.json").read_text())["layers"]
        assert ranks_y == ranks_x
        for key in ("zero_shot_ppl", "held_out_ppl"):
            assert y[key] == pytest.approx(x[key], rel=1e-3), key
        steps = (ddp / "stages" / f"size-{y['size']:.2f}" / "train.jsonl").read_text()
        assert len(steps.splitlines()) == 6  # the token budget is global: 6 steps of 2 x 2
    # rank 0 alone wrote: one member directory per size, no stray temporaries
    assert sorted(p.name for p in (ddp / "members").iterdir()) == ["size-0.80", "size-0.90"]
    assert not [p for p in ddp.rglob(".*") if p.name.endswith((".tmp", ".old"))]
