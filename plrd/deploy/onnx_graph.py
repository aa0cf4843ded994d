"""Inspecting an exported graph: which weight matrices its MatMul/Gemm nodes multiply by.

A factored layer must reach ONNX as two products, x·downᵀ then ·upᵀ, never as one dense
[out, in] weight. :func:`graph_weight_products` lists the (k, n) shape of every constant
right-hand operand of a MatMul/Gemm (following Transpose of an initializer, which the exporter
leaves unfolded for large weights); :func:`expected_weight_products` lists what a model's
linear layers should give. Equal multisets prove the factored layers were kept factored.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from torch import nn

from plrd.core.layer import LowRankLinear
from plrd.deploy.errors import require_onnx_extra

Shape = tuple[int, int]


def expected_weight_products(model: nn.Module) -> list[Shape]:
    """(k, n) of each weight product of ``model``'s linear layers and output head, sorted.

    ``plrd.LowRankLinear`` (down [r, in], up [out, r]) gives (in, r) and (r, out); an
    ``nn.Linear`` [out, in] gives (in, out). Embedding lookups are not products.
    """
    shapes: list[Shape] = []
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            shapes += [(module.in_features, module.rank), (module.rank, module.out_features)]
        elif isinstance(module, nn.Linear):
            shapes.append((module.in_features, module.out_features))
    return sorted(shapes)


def _load(path: str | os.PathLike) -> Any:
    require_onnx_extra("onnx")
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _constant_shapes(graph: Any) -> dict[str, Shape]:
    """2-D initializers and Transpose([1, 0]) of them: value name → shape as multiplied."""
    shapes = {i.name: tuple(i.dims) for i in graph.initializer if len(i.dims) == 2}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in shapes:
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm in ([], [[1, 0]]):
                rows, cols = shapes[node.input[0]]
                shapes[node.output[0]] = (cols, rows)
    return shapes


def graph_weight_products(path: str | os.PathLike) -> list[Shape]:
    """(k, n) of each MatMul/Gemm whose right operand is a constant 2-D weight, sorted.

    Gemm's ``transB`` is applied, so an ``nn.Linear`` [out, in] reads (in, out) either way.
    """
    graph = _load(path).graph
    constants = _constant_shapes(graph)
    shapes: list[Shape] = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in constants:
            continue
        rows, cols = constants[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        shapes.append((cols, rows) if trans_b else (rows, cols))
    return sorted(shapes)


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Node count per ONNX op type of the main graph, most frequent first."""
    graph = _load(path).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())
