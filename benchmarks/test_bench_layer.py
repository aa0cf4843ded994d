"""LowRankLinear vs nn.Linear: forward and forward+backward at model-shaped layers.

Each benchmark group is one (pass, layer shape, device): the dense ``nn.Linear`` and the
factored layer at every kept fraction of the layer's parameters (rank = keep·in·out/(in + out)),
so pytest-benchmark's table shows them side by side. CPU runs fp32 through the torch path; CUDA
runs bf16 with ``PLRD_BACKEND`` = torch and triton (skipped without CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from bench_common import needs_cuda, paired_timing, rank_for_keep, synchronize
from shapes import KEEPS, LAYER_SHAPES, LayerShape
from torch import nn

from plrd import LowRankLinear

PASSES = ("fwd", "fwd+bwd")


class Variant(NamedTuple):
    device: str
    backend: str | None  # None: dense nn.Linear
    keep: float | None  # None: dense nn.Linear

    @property
    def label(self) -> str:
        if self.keep is None:
            return f"{self.device}-dense"
        return f"{self.device}-{self.backend}-keep{self.keep:.2f}"


def _variants(device: str) -> list[Variant]:
    backends = ("torch",) if device == "cpu" else ("torch", "triton")
    rows = [Variant(device, None, None)]
    rows += [Variant(device, backend, keep) for keep in KEEPS for backend in backends]
    return rows


def _cases() -> list[Any]:
    """Shape-major order so that the members of one group run one after another."""
    cases = []
    for shape in LAYER_SHAPES:
        for passes in PASSES:
            for device in ("cpu", "cuda"):
                marks = [needs_cuda] if device == "cuda" else []
                for variant in _variants(device):
                    cases.append(
                        pytest.param(
                            shape,
                            passes,
                            variant,
                            id=f"{shape.name}-{passes}-{variant.label}",
                            marks=marks,
                        )
                    )
    return cases


def _build(shape: LayerShape, variant: Variant, dtype: torch.dtype) -> nn.Module:
    factory = {"device": variant.device, "dtype": dtype}
    if variant.keep is None:
        return nn.Linear(shape.in_features, shape.out_features, bias=shape.bias, **factory)
    rank = rank_for_keep(shape.in_features, shape.out_features, variant.keep)
    return LowRankLinear(shape.in_features, shape.out_features, rank, bias=shape.bias, **factory)


def _weight_count(layer: nn.Module) -> int:
    return sum(p.numel() for name, p in layer.named_parameters() if name != "bias")


@pytest.mark.parametrize(("shape", "passes", "variant"), _cases())
def test_layer(
    benchmark: Any,
    set_backend: Callable[[str], None],
    shape: LayerShape,
    passes: str,
    variant: Variant,
) -> None:
    device = variant.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens = shape.cpu_tokens if device == "cpu" else shape.cuda_tokens
    set_backend(variant.backend or "auto")
    torch.manual_seed(0)
    layer = _build(shape, variant, dtype)
    x = torch.randn(tokens, shape.in_features, device=device, dtype=dtype)
    dense_flops = 2 * tokens * shape.in_features * shape.out_features
    if variant.keep is None:
        flops = dense_flops
    else:
        flops = 2 * tokens * layer.rank * (shape.in_features + shape.out_features)

    benchmark.group = f"layer {passes} {shape.name} M={tokens} {device}"
    benchmark.extra_info.update(
        {
            "kind": "layer",
            "shape": shape.name,
            "in_features": shape.in_features,
            "out_features": shape.out_features,
            "tokens": tokens,
            "pass": passes,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "backend": variant.backend,
            "keep": variant.keep,
            "rank": getattr(layer, "rank", None),
            "weights": _weight_count(layer),
            "dense_weights": shape.in_features * shape.out_features,
            "flops": flops * (3 if passes == "fwd+bwd" else 1),
        }
    )

    if passes == "fwd":

        def run() -> None:
            layer(x)
            synchronize(device)

        with torch.inference_mode():
            run()  # warm-up: allocator, kernel selection, autotuning
            benchmark(run)
    else:
        x.requires_grad_(True)
        grad_out = torch.randn(tokens, shape.out_features, device=device, dtype=dtype)
        inputs = [x, *layer.parameters()]

        def run() -> None:
            torch.autograd.grad(layer(x), inputs, grad_out)
            synchronize(device)

        run()
        benchmark(run)


#: (shape name, kept fraction, pairs): dense vs factored forward timed in alternating calls.
PAIRED_CASES = (("square-2048to2048", 0.25, 30), ("smollm2-576to1536", 0.5, 30))


@pytest.mark.parametrize(
    ("shape_name", "keep", "pairs"),
    [pytest.param(*case, id=f"{case[0]}-fwd-cpu-keep{case[1]:.2f}") for case in PAIRED_CASES],
)
def test_layer_paired(benchmark: Any, shape_name: str, keep: float, pairs: int) -> None:
    """nn.Linear vs LowRankLinear forward on the CPU, timed pair by pair (see paired_timing)."""
    shape = next(s for s in LAYER_SHAPES if s.name == shape_name)
    torch.manual_seed(0)
    dense = _build(shape, Variant("cpu", None, None), torch.float32)
    factored = _build(shape, Variant("cpu", "torch", keep), torch.float32)
    x = torch.randn(shape.cpu_tokens, shape.in_features)
    benchmark.group = "paired A/B: layer forward, dense vs factored (cpu)"
    benchmark.extra_info.update(
        {
            "kind": "layer-paired",
            "shape": shape.name,
            "tokens": shape.cpu_tokens,
            "keep": keep,
            "rank": factored.rank,
            "baseline": "nn.Linear",
            "candidate": f"LowRankLinear keep {keep}",
        }
    )
    with torch.inference_mode():
        paired_timing(benchmark, lambda: dense(x), lambda: factored(x), rounds=pairs)
