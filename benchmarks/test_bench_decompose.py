"""Decomposition speed on the CPU: factoring a dense layer, re-truncating a factored layer, and
collecting the calibration Grams of a whole model.

* ``factor``: ``LowRankLinear.from_linear`` at half the layer's parameters, by plain SVD and by
  whitened SVD (Cholesky of the Gram, SVD of W·L, triangular solve).
* ``retruncate``: rank r → k of a factored layer by the QR core (``layer.truncate``,
  O((in + out)·r²)) vs a dense SVD of up·down (``from_linear(layer.to_linear(), k)``,
  O(in·out·min(in, out))); report.py prints the ratio of each pair.
* ``grams``: ``plrd.collect_grams`` over the SmolLM2-shaped model vs the same forward passes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_common import random_tokens, rank_for_keep
from shapes import GRAM_BATCHES, LAYER_SHAPES, MODEL_FORWARD_BATCH, RETRUNCATE_CASES
from torch import nn

import plrd
from plrd import LowRankLinear

CALIBRATION_TOKENS = 4096
FACTOR_SHAPES = [s for s in LAYER_SHAPES if s.name == "smollm2-576to1536"]


def _gram(in_features: int, seed: int = 0) -> torch.Tensor:
    """Σ xᵀx [in, in] (float64) of correlated random inputs, as collect_grams would return."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    x = torch.randn(CALIBRATION_TOKENS, in_features, generator=generator) @ mix
    x = x.double()
    return x.T @ x


@pytest.mark.parametrize("method", ["svd", "whiten"])
@pytest.mark.parametrize("shape", FACTOR_SHAPES, ids=[s.name for s in FACTOR_SHAPES])
def test_factor(benchmark: Any, shape: Any, method: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features, bias=shape.bias)
    rank = rank_for_keep(shape.in_features, shape.out_features, 0.5)
    gram = _gram(shape.in_features) if method == "whiten" else None
    benchmark.group = f"decompose: factor a dense layer {shape.name} keep0.50 (rank {rank})"
    benchmark.extra_info.update(
        {"kind": "factor", "shape": shape.name, "method": method, "rank": rank}
    )
    benchmark.pedantic(
        lambda: LowRankLinear.from_linear(linear, rank, gram), rounds=3, warmup_rounds=1
    )


def _retruncate_params() -> list[Any]:
    params = []
    for name, in_features, out_features, rank, new_rank in RETRUNCATE_CASES:
        big = in_features * out_features >= 4096 * 4096
        grams = ("none",) if big else ("none", "gram")
        for gram in grams:
            for path in ("qr-core", "dense-svd"):
                params.append(
                    pytest.param(
                        name,
                        in_features,
                        out_features,
                        rank,
                        new_rank,
                        gram,
                        path,
                        id=f"{name}-{gram}-{path}",
                    )
                )
    return params


@pytest.mark.parametrize(
    ("name", "in_features", "out_features", "rank", "new_rank", "gram", "path"),
    _retruncate_params(),
)
def test_retruncate(
    benchmark: Any,
    name: str,
    in_features: int,
    out_features: int,
    rank: int,
    new_rank: int,
    gram: str,
    path: str,
) -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(in_features, out_features, rank, bias=False)
    g = _gram(in_features) if gram == "gram" else None
    benchmark.group = f"decompose: re-truncate {name} ({'whitened' if g is not None else 'plain'})"
    benchmark.extra_info.update(
        {
            "kind": "retruncate",
            "case": name,
            "gram": gram,
            "path": path,
            "rank": rank,
            "new_rank": new_rank,
        }
    )
    if path == "qr-core":
        target = lambda: layer.truncate(new_rank, g)
        rounds, warmup = 3, 1
    else:
        target = lambda: LowRankLinear.from_linear(layer.to_linear(), new_rank, g)
        # A dense 4096² SVD in float64 takes about a minute on 2 cores: time it once.
        big = in_features * out_features >= 4096 * 4096
        rounds, warmup = (1, 0) if big else (3, 1)
    result = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup)
    assert result.rank == new_rank


@pytest.mark.parametrize("what", ["forward-only", "collect_grams"])
def test_collect_grams(benchmark: Any, smollm2_parent: nn.Module, what: str) -> None:
    batch, length = MODEL_FORWARD_BATCH
    vocab = smollm2_parent.config.vocab_size
    batches = [random_tokens(batch, length, vocab, seed) for seed in range(GRAM_BATCHES)]
    benchmark.group = f"decompose: Gram collection smollm2, {GRAM_BATCHES}x{batch}x{length} tokens"
    benchmark.extra_info.update(
        {"kind": "grams", "what": what, "tokens": GRAM_BATCHES * batch * length}
    )
    if what == "collect_grams":
        target = lambda: plrd.collect_grams(smollm2_parent, batches, progress=False)
    else:

        def target() -> None:
            with torch.no_grad():
                for ids in batches:
                    smollm2_parent(ids)

    benchmark.pedantic(target, rounds=2, warmup_rounds=1)
