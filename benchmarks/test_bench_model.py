"""Whole-model speed: a SmolLM2-135M-shaped Llama, its decomposed members, and dense models of
the members' sizes, on the CPU (fp32, random weights: only speed is measured).

Models (ids): ``parent`` (dense, 134.5M parameters), ``member-keepK`` (``plrd.decompose`` to K of
the parent's parameters, progressively), ``dense-same-size-keepK`` (a dense Llama of the same
depth with smaller hidden and MLP widths and the member's parameter count within 2%), and, for
the forward only, ``dense-same-width-keep0.50`` (the same size at the parent's hidden width 576,
MLP 240 wide: it isolates the factored layers from the cost of a wider hidden state).

Groups: forward (scoring a batch, all logits), decode (greedy generation with the KV cache at
batch 1) and one training step (forward, backward, AdamW step). Every result stores tokens/s in
``extra_info``. The ``paired A/B`` group times a member and its baseline in alternating calls.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from bench_common import paired_timing, random_tokens, record_throughput
from shapes import KEEPS, MODEL_DECODE, MODEL_FORWARD_BATCH, MODEL_TRAIN_BATCH

import plrd

MODEL_IDS = (
    ["parent"]
    + [f"member-keep{keep:.2f}" for keep in KEEPS]
    + [f"dense-same-size-keep{keep:.2f}" for keep in KEEPS]
)
#: Forward only: the keep-0.5 member's size at the parent's hidden width (MLP 240 wide).
WIDTH_IDS = ["dense-same-width-keep0.50"]
FIXTURES = {
    "member": "smollm2_members",
    "dense-same-size": "same_size_dense",
    "dense-same-width": "same_width_dense",
}


@pytest.fixture
def get_model(request: pytest.FixtureRequest) -> Callable[[str], torch.nn.Module]:
    """``get_model(id)``: the model named by a MODEL_IDS entry; builds only what is asked for."""

    def get(model_id: str) -> torch.nn.Module:
        if model_id == "parent":
            return request.getfixturevalue("smollm2_parent")
        kind, _, keep = model_id.rpartition("-keep")
        return request.getfixturevalue(FIXTURES[kind])[float(keep)]

    return get


def _describe(benchmark: Any, model_id: str, model: torch.nn.Module, parent_params: int) -> None:
    params = plrd.count_parameters(model)
    config = model.config
    benchmark.extra_info.update(
        {
            "kind": "model",
            "model": model_id,
            "params": params,
            "size": params / parent_params,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "factored_layers": sum(
                isinstance(module, plrd.LowRankLinear) for module in model.modules()
            ),
        }
    )


def _parent_params(get_model: Callable[[str], torch.nn.Module]) -> int:
    return plrd.count_parameters(get_model("parent"))


@pytest.mark.parametrize("model_id", MODEL_IDS + WIDTH_IDS)
def test_model_forward(
    benchmark: Any, get_model: Callable[[str], torch.nn.Module], model_id: str
) -> None:
    model = get_model(model_id)
    batch, length = MODEL_FORWARD_BATCH
    ids = random_tokens(batch, length, model.config.vocab_size)
    benchmark.group = f"model forward {batch}x{length} tokens cpu"
    _describe(benchmark, model_id, model, _parent_params(get_model))
    with torch.inference_mode():
        benchmark.pedantic(lambda: model(input_ids=ids, use_cache=False), rounds=5, warmup_rounds=1)
    record_throughput(benchmark, batch * length)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_model_decode(
    benchmark: Any, get_model: Callable[[str], torch.nn.Module], model_id: str
) -> None:
    model = get_model(model_id)
    prompt, new_tokens = MODEL_DECODE
    ids = random_tokens(1, prompt, model.config.vocab_size)
    benchmark.group = f"model decode batch 1, {prompt}-token prompt + {new_tokens} new, cpu"
    _describe(benchmark, model_id, model, _parent_params(get_model))

    def generate() -> None:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == prompt + new_tokens

    with torch.inference_mode():
        benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    record_throughput(benchmark, new_tokens)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_model_train_step(
    benchmark: Any, get_model: Callable[[str], torch.nn.Module], model_id: str
) -> None:
    model = copy.deepcopy(get_model(model_id)).train()
    batch, length = MODEL_TRAIN_BATCH
    ids = random_tokens(batch, length, model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    benchmark.group = f"model train step {batch}x{length} tokens cpu (fwd+bwd+AdamW)"
    _describe(benchmark, model_id, model, _parent_params(get_model))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)  # warm-up creates AdamW's state
    record_throughput(benchmark, batch * length)


@pytest.mark.parametrize(
    ("candidate", "baseline"),
    [
        pytest.param("member-keep0.50", "parent", id="member-keep0.50-vs-parent"),
        pytest.param(
            "member-keep0.50", "dense-same-size-keep0.50", id="member-keep0.50-vs-dense-same-size"
        ),
        pytest.param(
            "member-keep0.50",
            "dense-same-width-keep0.50",
            id="member-keep0.50-vs-dense-same-width",
        ),
    ],
)
def test_model_forward_paired(
    benchmark: Any, get_model: Callable[[str], torch.nn.Module], candidate: str, baseline: str
) -> None:
    """Forward of a member and of its baseline, timed pair by pair (see paired_timing)."""
    models = {name: get_model(name) for name in (candidate, baseline)}
    batch, length = MODEL_FORWARD_BATCH
    ids = random_tokens(batch, length, models[candidate].config.vocab_size)
    benchmark.group = f"paired A/B: model forward {batch}x{length} tokens cpu"
    benchmark.extra_info.update(
        {
            "kind": "model-paired",
            "candidate": candidate,
            "baseline": baseline,
            "candidate_params": plrd.count_parameters(models[candidate]),
            "baseline_params": plrd.count_parameters(models[baseline]),
            "tokens": batch * length,
        }
    )
    with torch.inference_mode():
        paired_timing(
            benchmark,
            lambda: models[baseline](input_ids=ids, use_cache=False),
            lambda: models[candidate](input_ids=ids, use_cache=False),
            rounds=8,
        )
