"""Tracing a transformers causal LM to ONNX with a flat KV-cache interface.

:func:`trace_onnx` wraps the model in :class:`FlatCacheLM` (flat tensors in and out, a
``DynamicCache`` built inside) and runs ``torch.onnx.export(dynamo=True)`` with dynamic batch,
sequence and past axes. The interface is documented in :mod:`plrd.deploy.onnx_runtime`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from plrd.deploy.errors import ExportError

#: Example sizes traced by torch.export: batch, new tokens, past tokens (all ≥ 2, so that no
#: dynamic axis is specialised to 0 or 1; the graph runs with any sizes, past 0 included).
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 5, 3


def output_cache(output: Any) -> Any:
    """The cache a transformers forward returned (``output.cache``, or ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per layer of a transformers ``DynamicCache`` (old and new API)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def cache_kwarg(model: nn.Module) -> str:
    """The forward's cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class FlatCacheLM(nn.Module):
    """The model on flat tensors, key then value per layer for L layers:

    (input_ids [B,S], attention_mask [B,P+S], position_ids [B,S], 2·L past [B,H,P,D])
    → (logits [B,S,V], 2·L present [B,H,P+S,D]).
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model, self.num_layers, self.cache_kwarg = model, num_layers, cache_kwarg(model)

    def _cache(self, past: Sequence[torch.Tensor]) -> Any:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        return cache

    def forward(self, input_ids, attention_mask, position_ids, *past):
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: self._cache(past)},
        )
        present = [t for kv in cache_tensors(output_cache(output)) for t in kv]
        return (output.logits, *present)


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) read from the cache of a two-token forward."""
    with torch.no_grad():
        output = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    cache = output_cache(output)
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if kinds - {"DynamicLayer"}:
        raise ExportError(
            f"{type(model).__name__} uses cache layers {sorted(kinds)}; the ONNX export handles "
            "full-attention DynamicLayer caches only (no sliding window yet)"
        )
    keys = cache_tensors(cache)
    return len(keys), keys[0][0].shape[1], keys[0][0].shape[3]


def io_names(layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    return inputs, ["logits", *(f"present.{n}" for n in kv)]


def _sample_inputs(model: nn.Module, layers: int, heads: int, head_dim: int) -> tuple:
    batch, seq, past = SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, heads, past, head_dim, generator=g) for _ in range(2 * layers)]
    return (ids, mask, positions, *kv)


def _dynamic_shapes(layers: int) -> tuple:
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    tokens = {0: batch, 1: seq}
    # the mask spans past + seq, which a Dim cannot express; DYNAMIC lets torch.export solve it
    mask = {0: batch, 1: Dim.DYNAMIC}
    return (tokens, mask, tokens, tuple({0: batch, 2: past} for _ in range(2 * layers)))


def _name_axes(program: Any) -> None:
    """Readable symbolic axes on the graph's inputs and outputs (optimum's names)."""
    import onnx_ir as ir

    b, s, p, t = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
    graph = program.model.graph
    for value in [*graph.inputs, *graph.outputs]:
        dims = list(value.shape)
        if value.name in ("input_ids", "position_ids"):
            dims = [b, s]
        elif value.name == "attention_mask":
            dims = [b, t]
        elif value.name == "logits":
            dims = [b, s, dims[2]]
        else:  # past_key_values.* / present.*
            dims = [b, dims[1], p if value.name.startswith("past") else t, dims[3]]
        value.shape = ir.Shape(dims)


def trace_onnx(model: nn.Module, opset: int | None) -> tuple[Any, int]:
    """``(ONNXProgram, layers)`` from ``torch.onnx.export(dynamo=True)`` of the wrapper."""
    layers, heads, head_dim = kv_layout(model)
    inputs, outputs = io_names(layers)
    try:
        with warnings.catch_warnings():  # axis renaming notes; the axes are named below
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            program = torch.onnx.export(
                FlatCacheLM(model, layers).eval(),
                _sample_inputs(model, layers, heads, head_dim),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(layers),
                input_names=inputs,
                output_names=outputs,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; keep the cause chained
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        name = type(model).__name__
        raise ExportError(f"torch.onnx.export failed for {name}: {first}") from error
    _name_axes(program)
    return program, layers
