"""Functions shared by the benchmark modules: devices, throughput records, model builders."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from shapes import SMOLLM2_CONFIG

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work so that a timed call includes it; no-op on the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def record_throughput(benchmark: Any, tokens: int) -> None:
    """Store tokens/s (from the fastest and the median round) in the result's extra_info.

    Does nothing under ``--benchmark-disable`` (no timings).
    """
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    benchmark.extra_info["tokens"] = tokens
    benchmark.extra_info["tokens_per_s"] = tokens / stats.min
    benchmark.extra_info["tokens_per_s_median"] = tokens / stats.median


def rank_for_keep(in_features: int, out_features: int, keep: float) -> int:
    """The rank whose factors hold ``keep`` of a dense layer's in·out weights (at least 1)."""
    return max(1, int(keep * in_features * out_features / (in_features + out_features)))


def llama_config(**overrides: Any) -> Any:
    """A ``LlamaConfig`` with SmolLM2-135M's architecture, fields overridden by ``overrides``."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**SMOLLM2_CONFIG, **overrides})


def meta_parameter_count(config: Any) -> int:
    """Parameters of a Llama built from ``config`` (tied weights once), without allocating it."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _solve_intermediate(target_params: int, hidden: int, depth: int) -> tuple[int, dict]:
    """The MLP width giving ``target_params`` at this hidden size and depth (count is linear)."""
    heads = hidden // SMOLLM2_CONFIG["head_dim"]
    shape = {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 3,
        "num_hidden_layers": depth,
    }
    base = meta_parameter_count(llama_config(intermediate_size=1, **shape))
    per_unit = meta_parameter_count(llama_config(intermediate_size=2, **shape)) - base
    return round((target_params - base) / per_unit) + 1, shape


def same_size_dense_config(
    target_params: int, depth: int | None = None, hidden: int | None = None
) -> Any:
    """A dense SmolLM2-like ``LlamaConfig`` with ≈ ``target_params`` parameters, same depth.

    Widths shrink in steps that keep the head size (64) and the 3:1 query/key-value head ratio:
    hidden ∈ {576, 384, 192}. The largest hidden whose matching MLP width is at least the
    hidden size is taken (the usual shape of a smaller model); the MLP width is then solved
    exactly (the count is linear in it). ``hidden`` fixes the hidden size instead (the MLP
    alone shrinks; it must stay at least 1 wide).
    """
    head_dim = SMOLLM2_CONFIG["head_dim"]
    depth = depth or SMOLLM2_CONFIG["num_hidden_layers"]
    if hidden is not None:
        intermediate, shape = _solve_intermediate(target_params, hidden, depth)
        if intermediate < 1:
            raise ValueError(
                f"a dense Llama of depth {depth} and hidden {hidden} has more than "
                f"{target_params} parameters even with an MLP 1 wide; choose a smaller hidden"
            )
        return llama_config(intermediate_size=intermediate, **shape)
    for hidden in range(SMOLLM2_CONFIG["hidden_size"], 0, -3 * head_dim):
        intermediate, shape = _solve_intermediate(target_params, hidden, depth)
        if intermediate >= hidden:
            return llama_config(intermediate_size=intermediate, **shape)
    raise ValueError(
        f"no SmolLM2-like dense config of depth {depth} has {target_params} parameters; "
        f"even hidden {3 * head_dim} needs an MLP narrower than the hidden size"
    )


def build_llama(config: Any, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp32 ``LlamaForCausalLM`` in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, length], reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def paired_timing(
    benchmark: Any,
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    rounds: int,
    warmup: int = 1,
) -> dict[str, float]:
    """Time ``baseline`` and ``candidate`` in alternating calls; store their ratios in extra_info.

    On a shared machine the load drifts over seconds, so two cases timed one after the other can
    see different machines. Here each round times both, back to back, in alternating order, and
    the speedup is taken per round (baseline time / candidate time): its median cancels slow
    drift. The benchmark's own time is that of one pair. Returns the stored numbers.
    """
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    order = [("baseline", baseline), ("candidate", candidate)]

    def one_pair() -> None:
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        order.reverse()

    for _ in range(warmup):
        one_pair()
    for recorded in times.values():
        recorded.clear()
    benchmark.pedantic(one_pair, rounds=rounds, iterations=1)
    ratios = sorted(b / c for b, c in zip(times["baseline"], times["candidate"], strict=True))
    numbers = {
        "baseline_min_s": min(times["baseline"]),
        "candidate_min_s": min(times["candidate"]),
        "baseline_median_s": statistics.median(times["baseline"]),
        "candidate_median_s": statistics.median(times["candidate"]),
        "speedup_min": min(times["baseline"]) / min(times["candidate"]),
        "speedup_median_of_pairs": statistics.median(ratios),
        "pairs": len(ratios),
    }
    benchmark.extra_info.update(numbers)
    return numbers
