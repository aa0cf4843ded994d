"""Checkpoints of (partly) factored models: ``model.safetensors`` + ``plrd.json``.

``plrd.json`` records which layers are ``LowRankLinear`` and at what rank, so ``plrd.load`` can
rebuild the same structure on a freshly built dense model before loading the weights strictly,
and the size and SHA-256 of the weights file, so a corrupt or swapped file is refused::

    {"format": "plrd", "format_version": 2, "plrd_version": "...", "dtype": "float32",
     "num_parameters": 123456,
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "in": 64, "out": 64, "rank": 12,
                 "bias": false}, ...],
     "weights": {"file": "model.safetensors", "bytes": 493872, "sha256": "3f5a..."}}

Format version 1 (no ``weights`` record) is still read; its weights are checked structurally
but not against a digest.

Weights go through ``safetensors.torch.save_model``/``load_model``, which store a tensor shared
under several names (tied embeddings) once and restore it on load; the model object keeps its
own tying, so tied weights stay tied. No pickle is involved anywhere.

Crash safety: ``save`` writes the weights to a temporary sibling, hashes it, removes any old
``plrd.json``, renames the weights into place, and writes the new ``plrd.json`` last (also
atomically). An interrupted save therefore leaves either the old complete checkpoint or a
directory without ``plrd.json`` (refused by ``load``), never a manifest describing other weights.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plrd.core.counting import count_parameters
from plrd.core.layer import LowRankLinear
from plrd.core.kinds import is_linear_like, is_lowrank, layer_shape, set_submodule
from plrd.io.atomic import atomic_path, write_json
from plrd.io.integrity import (
    check_record,
    file_record,
    is_sha256,
    read_safetensors_header,
    sha256_file,
)

FORMAT = "plrd"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "plrd.json"

__all__ = ["save", "load", "read_manifest", "verify_checkpoint", "weights_checksum"]


def _dtype_name(model: nn.Module) -> str:
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    if not counts:
        return "none"
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def _check_model(model: Any, call: str) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{call} needs a torch.nn.Module as model, got {type(model).__name__}; pass the "
            "model object itself"
        )


def _as_dir(directory: Any, call: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(
            f"{call} needs a directory path (str or os.PathLike), got {type(directory).__name__}"
        )
    return Path(directory)


def manifest(model: nn.Module) -> dict[str, Any]:
    """The ``plrd.json`` content describing ``model``'s factored layers (no weights record)."""
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``plrd.json`` into ``directory`` (created if needed).

    Works for any model; tied tensors are stored once. A Hugging Face model also gets its
    ``config.json`` (and generation config), so ``plrd.load_pretrained(directory)`` rebuilds
    it. ``plrd.json`` records the factored layers and the weights file's size and SHA-256 (see
    the module docs for the write order).
    Returns the directory.
    """
    from safetensors.torch import save_model

    _check_model(model, "plrd.save")
    directory = _as_dir(directory, "plrd.save")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a directory; pass a directory to save into")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"parameter {meta[0]!r} is on the meta device (it has no data); load or "
            "initialise the weights before plrd.save"
        )
    directory.mkdir(parents=True, exist_ok=True)
    info = manifest(model)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
        _fsync(tmp)
        record = file_record(tmp)
        record["file"] = WEIGHTS_NAME
        (directory / MANIFEST_NAME).unlink(missing_ok=True)  # never describe other weights
    info["weights"] = record
    _save_hf_config(model, directory)
    write_json(directory / MANIFEST_NAME, info)
    return directory


def _save_hf_config(model: nn.Module, directory: Path) -> None:
    """``config.json`` (and ``generation_config.json``) of a Hugging Face model, so that
    ``plrd.load_pretrained`` can rebuild its architecture; nothing for other models."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "save_pretrained", None)):
        return
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if callable(getattr(generation, "save_pretrained", None)):
        generation.save_pretrained(directory)


def weights_checksum(directory: str | os.PathLike) -> str:
    """Hex SHA-256 of ``directory/model.safetensors`` (what ``plrd.json`` records).

    Raises ValueError when the file is missing.
    """
    weights = _as_dir(directory, "plrd.weights_checksum") / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found; pass a directory written by plrd.save")
    return sha256_file(weights)


def _manifest_missing(directory: Path, path: Path) -> ValueError:
    if not directory.is_dir():
        return ValueError(f"{directory} does not exist (or is not a directory): no checkpoint")
    if (directory / WEIGHTS_NAME).is_file():
        return ValueError(
            f"{path} not found beside {WEIGHTS_NAME}: the save was interrupted or the manifest "
            "was deleted; the weights cannot be trusted, re-save the checkpoint"
        )
    return ValueError(
        f"{path} not found: {directory} is not a plrd checkpoint (write one with plrd.save)"
    )


def _check_weights_record(path: Path, record: Any) -> None:
    ok = (
        isinstance(record, dict)
        and record.get("file") == WEIGHTS_NAME
        and isinstance(record.get("bytes"), int)
        and not isinstance(record.get("bytes"), bool)
        and record["bytes"] >= 0
        and is_sha256(record.get("sha256"))
    )
    if not ok:
        raise ValueError(
            f'{path}: "weights" = {record!r} needs file "{WEIGHTS_NAME}", bytes (int) and '
            "sha256 (64 hex digits): the manifest is corrupt; re-save the checkpoint"
        )


def _check_layer_entries(path: Path, layers: Any) -> None:
    if not isinstance(layers, list):
        raise ValueError(f'{path}: "layers" must be a list')
    seen = set()
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
        if entry["name"] in seen:
            raise ValueError(f"{path}: layer {entry['name']!r} is listed twice")
        seen.add(entry["name"])


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the structure of ``plrd.json`` (ValueError naming the file)."""
    directory = _as_dir(directory, "plrd.io.checkpoint.read_manifest")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise _manifest_missing(directory, path)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: cannot be read as JSON ({e}): the manifest is corrupt; re-save the checkpoint"
        ) from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f'{path}: not a plrd manifest (missing "format": "{FORMAT}")')
    version = info.get("format_version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 1 <= version <= FORMAT_VERSION
    ):
        raise ValueError(
            f"{path}: format_version {version!r} is not supported (this plrd reads up to "
            f"{FORMAT_VERSION}); upgrade plrd"
        )
    _check_layer_entries(path, info.get("layers"))
    params = info.get("num_parameters")
    if params is not None and (isinstance(params, bool) or not isinstance(params, int)):
        raise ValueError(f'{path}: "num_parameters" = {params!r} must be an integer')
    if version >= 2:
        _check_weights_record(path, info.get("weights"))
    return info


def verify_checkpoint(directory: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """Check a checkpoint's files without a model; return its validated ``plrd.json``.

    Checks that ``plrd.json`` is well formed, that ``model.safetensors`` exists and is
    structurally complete (header consistent with the file length), and that its size and
    SHA-256 match the manifest's record (format 2). ``sha256``, when given (e.g. from
    ``family.json``), must match too. Raises ValueError naming the file otherwise.
    """
    directory = _as_dir(directory, "plrd.io.checkpoint.verify_checkpoint")
    info = read_manifest(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found; the checkpoint in {directory} is incomplete")
    read_safetensors_header(weights)
    record = info.get("weights")
    if record is not None:
        check_record(weights, record["bytes"], record["sha256"])
    if sha256 is not None:
        expected = sha256.lower() if isinstance(sha256, str) else sha256
        if not is_sha256(expected):
            raise ValueError(f"sha256={sha256!r} is not a 64-digit hex SHA-256 digest")
        got = record["sha256"] if record is not None else sha256_file(weights)
        if got != expected:
            raise ValueError(
                f"{weights}: checksum mismatch (expected {expected}, got {got}): the file is "
                "not the one recorded (corrupt, modified or replaced); re-save or restore it"
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


def _mismatch(key: str, shape: tuple[int, ...] | None, recorded: dict[str, dict]) -> str | None:
    """A message for a weights tensor that contradicts ``plrd.json``'s layer record, or None."""
    layer, _, leaf = key.rpartition(".")
    entry = recorded.get(layer)
    if entry is not None and leaf == "weight":
        return (
            f"holds a dense weight for layer {layer!r} but {MANIFEST_NAME} records it as "
            f"factored (rank {entry['rank']})"
        )
    if entry is None and leaf in ("up", "down") and shape is None:
        return f"holds factored tensor {key!r} but {MANIFEST_NAME} does not record layer {layer!r}"
    if entry is not None and leaf in ("up", "down") and shape is not None and len(shape) == 2:
        rank = shape[1] if leaf == "up" else shape[0]
        if rank != entry["rank"]:
            return (
                f"holds layer {layer!r} at rank {rank} ({key} {shape}) but {MANIFEST_NAME} "
                f"records rank {entry['rank']}"
            )
    return None


def _check_weights(
    model: nn.Module,
    stored: dict[str, tuple[str, tuple[int, ...]]],
    weights: Path,
    info: dict[str, Any],
    manifest_path: Path,
) -> None:
    """Compare the safetensors header with ``model.state_dict()``: names and shapes.

    A model entry missing from the file is fine when it shares storage with an entry that is
    there (tied tensors are saved once). Contradictions with ``plrd.json`` are named as such.
    """
    state = model.state_dict()
    kind = type(model).__name__
    recorded = {e["name"]: e for e in info["layers"]}
    together = "the two files do not belong together; re-save the checkpoint"
    for key, (_, shape) in stored.items():
        if key not in state:
            problem = _mismatch(key, None, recorded)
            if problem is not None:
                raise ValueError(f"{weights}: {problem}: {together}")
            raise ValueError(
                f"{weights}: tensor {key!r} has no place in {kind}; this checkpoint belongs to a "
                "different architecture"
            )
        if tuple(state[key].shape) != shape:
            problem = _mismatch(key, shape, recorded)
            if problem is not None:
                raise ValueError(f"{weights}: {problem}: {together}")
            raise ValueError(
                f"{weights}: tensor {key!r} has shape {shape} but {kind} expects "
                f"{tuple(state[key].shape)}"
            )
    groups: dict[tuple, set[str]] = {}
    for key, tensor in state.items():
        groups.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), set()).add(key)
    for keys in groups.values():
        if not keys & stored.keys():
            raise ValueError(
                f"{weights}: tensor {sorted(keys)[0]!r} of {kind} is missing: the file is "
                "incomplete or belongs to another model"
            )
    expected = info.get("num_parameters")
    if expected is not None and expected != count_parameters(model):
        raise ValueError(
            f"{manifest_path}: records {expected:,} parameters but {kind} with the recorded "
            f"layers has {count_parameters(model):,}; the checkpoint belongs to a differently "
            "configured model (e.g. tied vs untied embeddings)"
        )


def load(directory: str | os.PathLike, model: nn.Module, verify: bool = True) -> nn.Module:
    """Load a ``plrd.save`` checkpoint into ``model`` (built with the same architecture).

    Checks, in order: ``plrd.json`` is well formed; ``model.safetensors`` is structurally
    complete (a truncated file is named as such); with ``verify`` (default) its size and SHA-256
    match the manifest's record (skip with ``verify=False`` only for files you modified on
    purpose); every recorded layer exists in ``model`` with the recorded shape and bias, and no
    unrecorded layer is factored; the tensor names and shapes in the weights file match the
    model with the recorded ranks. Then the recorded layers are replaced by ``LowRankLinear``
    of the recorded rank on the model's device and dtype, and the weights are loaded strictly.
    Raises ``ValueError`` naming the file (and the layer) on any problem, before any weight is
    touched (``model`` is left as it was). Returns ``model`` (modified in place).
    """
    from safetensors.torch import load_model

    _check_model(model, "plrd.load")
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}")
    directory = _as_dir(directory, "plrd.load")
    info = read_manifest(directory)
    manifest_path = directory / MANIFEST_NAME
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found; the checkpoint in {directory} is incomplete")
    stored = read_safetensors_header(weights)
    record = info.get("weights")
    if verify and record is not None:
        check_record(weights, record["bytes"], record["sha256"])
    _check_against(model, info, manifest_path)

    originals: dict[str, nn.Module] = {}
    try:
        for entry in info["layers"]:
            module = model.get_submodule(entry["name"])
            originals[entry["name"]] = module
            set_submodule(model, entry["name"], _placeholder(module, entry))
        _check_weights(model, stored, weights, info, manifest_path)
    except Exception:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise
    ref = next(model.parameters(), None)
    device = str(ref.device) if ref is not None else "cpu"
    try:
        load_model(model, str(weights), strict=True, device=device)
    except Exception as e:  # the checks above make this rare; name the file all the same
        raise ValueError(f"{weights}: cannot be loaded ({e}); re-save or restore it") from e
    return model
