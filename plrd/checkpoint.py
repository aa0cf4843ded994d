"""Checkpoints of (partly) factored models: ``model.safetensors`` + ``plrd.json``.

``plrd.json`` records which layers are ``LowRankLinear`` and at what rank, so ``plrd.load`` can
rebuild the same structure on a freshly built dense model before loading the weights strictly::

    {"format": "plrd", "format_version": 1, "plrd_version": "...", "dtype": "float32",
     "num_parameters": 123456,
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "in": 64, "out": 64, "rank": 12,
                 "bias": false}, ...]}

Weights go through ``safetensors.torch.save_model``/``load_model``, which store a tensor shared
under several names (tied embeddings) once and restore it on load; the model object keeps its
own tying, so tied weights stay tied. No pickle is involved anywhere. Both files are written
atomically (temporary sibling, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plrd.atomic import atomic_path, write_json
from plrd.counting import count_parameters
from plrd.layer import LowRankLinear
from plrd.targets import is_linear_like, is_lowrank, layer_shape, set_submodule

FORMAT = "plrd"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "plrd.json"


def _dtype_name(model: nn.Module) -> str:
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    if not counts:
        return "none"
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def manifest(model: nn.Module) -> dict[str, Any]:
    """The ``plrd.json`` content describing ``model``'s factored layers."""
    from plrd import __version__

    layers = [
        {
            "name": name,
            "in": module.in_features,
            "out": module.out_features,
            "rank": module.rank,
            "bias": module.bias is not None,
        }
        for name, module in model.named_modules()
        if is_lowrank(module)
    ]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plrd_version": __version__,
        "dtype": _dtype_name(model),
        "num_parameters": count_parameters(model),
        "layers": layers,
    }


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``plrd.json`` into ``directory`` (created if needed).

    Works for any model; tied tensors are stored once. Returns the directory.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = manifest(model)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
    write_json(directory / MANIFEST_NAME, info)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the structure of ``plrd.json`` (ValueError naming the file)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {directory} is not a plrd checkpoint (write one with plrd.save)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f'{path}: not a plrd manifest (missing "format": "{FORMAT}")')
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported (this plrd reads up to "
            f"{FORMAT_VERSION}); upgrade plrd"
        )
    layers = info.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f'{path}: "layers" must be a list')
    for i, entry in enumerate(layers):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and all(
                isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool)
                for k in ("in", "out", "rank")
            )
            and isinstance(entry.get("bias"), bool)
        )
        if not ok:
            raise ValueError(
                f"{path}: layers[{i}] = {entry!r} needs name (str), in, out, rank (int), "
                "bias (bool)"
            )
    return info


def _check_against(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    kind = type(model).__name__
    recorded = set()
    for entry in info["layers"]:
        name = entry["name"]
        recorded.add(name)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: layer {name!r} does not exist in {kind}; this checkpoint belongs "
                "to a different architecture"
            ) from None
        if not is_linear_like(module):
            raise ValueError(
                f"{path}: layer {name!r} is a {type(module).__name__} in {kind}, not a linear "
                "layer; this checkpoint belongs to a different architecture"
            )
        n_in, n_out = layer_shape(module)
        if (n_in, n_out) != (entry["in"], entry["out"]):
            raise ValueError(
                f"{path}: layer {name!r} is recorded as {entry['out']}x{entry['in']} "
                f"(out x in) but is {n_out}x{n_in} in {kind}"
            )
        has_bias = getattr(module, "bias", None) is not None
        if has_bias != entry["bias"]:
            raise ValueError(
                f"{path}: layer {name!r} is recorded with bias={entry['bias']} but has "
                f"bias={has_bias} in {kind}"
            )
        if not 1 <= entry["rank"] <= min(n_in, n_out):
            raise ValueError(
                f"{path}: layer {name!r} has rank {entry['rank']}, outside 1..{min(n_in, n_out)}"
            )
    extra = [n for n, m in model.named_modules() if is_lowrank(m) and n not in recorded]
    if extra:
        raise ValueError(
            f"{path}: {kind} has factored layer(s) not recorded in the checkpoint, e.g. "
            f"{extra[0]!r}; load into a freshly built (dense) model"
        )


def _placeholder(module: nn.Module, entry: dict[str, Any]) -> LowRankLinear:
    """An uninitialised LowRankLinear on ``module``'s device and dtype (weights loaded next)."""
    ref = next(module.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else None
    new = LowRankLinear(
        entry["in"], entry["out"], entry["rank"], bias=entry["bias"], device="meta", dtype=dtype
    )
    new = new.to_empty(device=device)
    if ref is not None:
        new.requires_grad_(ref.requires_grad)
    new.train(module.training)
    return new


def _check_weights(model: nn.Module, weights: Path) -> None:
    """Compare the safetensors header with ``model.state_dict()``: names and shapes.

    A model entry missing from the file is fine when it shares storage with an entry that is
    there (tied tensors are saved once).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{weights}: cannot be read as safetensors ({e})") from e
    state = model.state_dict()
    kind = type(model).__name__
    for key, shape in stored.items():
        if key not in state:
            raise ValueError(f"{weights}: tensor {key!r} has no place in {kind}")
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{weights}: tensor {key!r} has shape {shape} but {kind} expects "
                f"{tuple(state[key].shape)}"
            )
    groups: dict[tuple, set[str]] = {}
    for key, tensor in state.items():
        groups.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), set()).add(key)
    for keys in groups.values():
        if not keys & stored.keys():
            raise ValueError(f"{weights}: tensor {sorted(keys)[0]!r} of {kind} is missing")


def load(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a ``plrd.save`` checkpoint into ``model`` (built with the same architecture).

    Validates ``plrd.json`` against ``model`` (every recorded layer exists with the recorded
    shape and bias; no unrecorded factored layer), replaces the recorded layers by
    ``LowRankLinear`` of the recorded rank on the model's device and dtype, checks the tensor
    names and shapes in ``model.safetensors``, then loads it strictly. Raises ``ValueError``
    naming the file on any mismatch, before any weight is touched (``model`` is left as it
    was). Returns ``model`` (modified in place).
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    info = read_manifest(directory)
    manifest_path = directory / MANIFEST_NAME
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found; the checkpoint in {directory} is incomplete")
    _check_against(model, info, manifest_path)

    originals: dict[str, nn.Module] = {}
    try:
        for entry in info["layers"]:
            module = model.get_submodule(entry["name"])
            originals[entry["name"]] = module
            set_submodule(model, entry["name"], _placeholder(module, entry))
        _check_weights(model, weights)
    except Exception:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise
    ref = next(model.parameters(), None)
    device = str(ref.device) if ref is not None else "cpu"
    load_model(model, str(weights), strict=True, device=device)
    return model
