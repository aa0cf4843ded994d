"""Checkpoints of (partly) factored models: ``plrd.save``, ``plrd.load`` and their checks.

A checkpoint is a directory holding ``model.safetensors`` and the checkpoint info ``plrd.json``
(see ``plrd.io.info``: the factored layers and the weights file's size and SHA-256).

Weights go through ``safetensors.torch.save_model``/``load_model``, which store a tensor shared
under several names (tied embeddings) once and restore it on load; the model object keeps its
own tying, so tied weights stay tied. No pickle is involved anywhere.

Crash safety: ``save`` writes the weights to a temporary sibling, hashes it, removes any old
``plrd.json``, renames the weights into place, and writes the new ``plrd.json`` last (also
atomically). An interrupted save therefore leaves either the old complete checkpoint or a
directory without ``plrd.json`` (refused by ``load``), never an info file describing other
weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from plrd.core.checks import check_module
from plrd.core.counting import count_parameters
from plrd.core.kinds import is_linear_like, is_lowrank, layer_shape, set_submodule
from plrd.core.layer import LowRankLinear
from plrd.errors import DamagedFileError, InputError
from plrd.io.atomic import atomic_path, write_json
from plrd.io.hf import save_config
from plrd.io.info import INFO_FILE, WEIGHTS_FILE, as_dir, model_info, read_info
from plrd.io.integrity import (
    check_record,
    file_record,
    is_sha256,
    read_safetensors_header,
    sha256_file,
)

__all__ = ["save", "load", "verify_checkpoint", "weights_checksum"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _contiguous_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every parameter is contiguous (safetensors writes only such tensors);
    a strided one (``plrd.deploy.layout.decode_layout``) gets its strides back afterwards."""
    strided = [(p, p.data) for p in model.parameters() if not p.is_contiguous()]
    for param, data in strided:
        param.data = data.contiguous()
    try:
        yield
    finally:
        for param, data in strided:
            param.data = data


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``plrd.json`` into ``directory`` (created if needed).

    Works for any model, whatever the strides of its weights; tied tensors are stored once. A
    Hugging Face model also gets its ``config.json`` (and generation config), so
    ``plrd.load_pretrained(directory)`` rebuilds it. ``plrd.json`` records the factored layers
    and the weights file's size and SHA-256 (see the module docs for the write order).
    Returns the directory.
    """
    check_module(model, "plrd.save")
    directory = as_dir(directory, "plrd.save")
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file, not a directory; pass a directory to save into")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise InputError(
            f"parameter {meta[0]!r} is on the meta device (it has no data); load or "
            "initialise the weights before plrd.save"
        )
    directory.mkdir(parents=True, exist_ok=True)
    info = model_info(model)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        with _contiguous_weights(model):
            safetensors.torch.save_model(model, str(tmp), metadata={"format": "pt"})
        _fsync(tmp)
        record = file_record(tmp)
        record["file"] = WEIGHTS_FILE
        (directory / INFO_FILE).unlink(missing_ok=True)  # never describe other weights
    info["weights"] = record
    save_config(model, directory)
    write_json(directory / INFO_FILE, info)
    return directory


def weights_checksum(directory: str | os.PathLike) -> str:
    """Hex SHA-256 of ``directory/model.safetensors`` (what ``plrd.json`` records).

    Raises DamagedFileError when the file is missing.
    """
    weights = as_dir(directory, "plrd.weights_checksum") / WEIGHTS_FILE
    if not weights.is_file():
        raise DamagedFileError(f"{weights} not found; pass a directory written by plrd.save")
    return sha256_file(weights)


def _weights_file(directory: Path) -> Path:
    """``directory/model.safetensors``; DamagedFileError when it is missing."""
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DamagedFileError(
            f"{weights} not found: the checkpoint in {directory} is incomplete; re-save it"
        )
    return weights


def _check_digest(weights: Path, record: dict | None, sha256: Any) -> None:
    """The weights' SHA-256 (as recorded, or computed for format 1) must equal ``sha256``."""
    expected = sha256.lower() if isinstance(sha256, str) else sha256
    if not is_sha256(expected):
        raise InputError(
            f"sha256={sha256!r} is not a 64-digit hex SHA-256 digest; pass the digest plrd "
            "recorded (plrd.weights_checksum)"
        )
    got = record["sha256"] if record is not None else sha256_file(weights)
    if got != expected:
        raise DamagedFileError(
            f"{weights}: checksum mismatch (expected {expected}, got {got}): the file is "
            "not the one recorded (corrupt, modified or replaced); re-save or restore it"
        )


def verify_checkpoint(directory: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """Check a checkpoint's files without a model; return its validated ``plrd.json``.

    Checks that ``plrd.json`` is well formed, that ``model.safetensors`` exists and is
    structurally complete (header consistent with the file length), and that its size and
    SHA-256 match the info's record (format 2). ``sha256``, when given (e.g. from
    ``family.json``), must match too. Raises DamagedFileError naming the file otherwise
    (InputError for a directory that is no checkpoint or a malformed ``sha256``).
    """
    directory = as_dir(directory, "plrd.io.checkpoint.verify_checkpoint")
    info = read_info(directory)
    weights = _weights_file(directory)
    read_safetensors_header(weights)
    record = info.get("weights")
    if record is not None:
        check_record(weights, record["bytes"], record["sha256"])
    if sha256 is not None:
        _check_digest(weights, record, sha256)
    return info


def _different(path: Path, problem: str) -> DamagedFileError:
    return DamagedFileError(
        f"{path}: {problem}; this checkpoint belongs to a different architecture"
    )


def _check_entry(model: nn.Module, entry: dict[str, Any], path: Path) -> None:
    """The recorded layer exists in ``model`` as a linear layer of the recorded shape/bias."""
    kind, name = type(model).__name__, entry["name"]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise _different(path, f"layer {name!r} does not exist in {kind}") from None
    if not is_linear_like(module):
        raise _different(
            path, f"layer {name!r} is a {type(module).__name__} in {kind}, not a linear layer"
        )
    n_in, n_out = layer_shape(module)
    if (n_in, n_out) != (entry["in"], entry["out"]):
        raise _different(
            path,
            f"layer {name!r} is recorded as {entry['out']}x{entry['in']} (out x in) but is "
            f"{n_out}x{n_in} in {kind}",
        )
    has_bias = getattr(module, "bias", None) is not None
    if has_bias != entry["bias"]:
        raise _different(
            path,
            f"layer {name!r} is recorded with bias={entry['bias']} but has bias={has_bias} "
            f"in {kind}",
        )
    if not 1 <= entry["rank"] <= min(n_in, n_out):
        raise DamagedFileError(
            f"{path}: layer {name!r} has rank {entry['rank']}, outside 1..{min(n_in, n_out)}; "
            "the file is damaged, re-save the checkpoint"
        )


def _check_against(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    """Every recorded layer fits ``model``, and no unrecorded layer of it is factored."""
    for entry in info["layers"]:
        _check_entry(model, entry, path)
    recorded = {entry["name"] for entry in info["layers"]}
    extra = [n for n, m in model.named_modules() if is_lowrank(m) and n not in recorded]
    if extra:
        raise DamagedFileError(
            f"{path}: {type(model).__name__} has factored layer(s) not recorded in the "
            f"checkpoint, e.g. {extra[0]!r}; load into a freshly built (dense) model"
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
            f"holds a dense weight for layer {layer!r} but {INFO_FILE} records it as "
            f"factored (rank {entry['rank']})"
        )
    if entry is None and leaf in ("up", "down") and shape is None:
        return f"holds factored tensor {key!r} but {INFO_FILE} does not record layer {layer!r}"
    if entry is not None and leaf in ("up", "down") and shape is not None and len(shape) == 2:
        rank = shape[1] if leaf == "up" else shape[0]
        if rank != entry["rank"]:
            return (
                f"holds layer {layer!r} at rank {rank} ({key} {shape}) but {INFO_FILE} "
                f"records rank {entry['rank']}"
            )
    return None


def _check_stored(
    model: nn.Module,
    stored: dict[str, tuple[str, tuple[int, ...]]],
    weights: Path,
    recorded: dict[str, dict],
) -> None:
    """Every tensor in the file has a place of the same shape in ``model.state_dict()``."""
    state = model.state_dict()
    kind = type(model).__name__
    together = "the two files do not belong together; re-save the checkpoint"
    for key, (_, shape) in stored.items():
        if key not in state:
            problem = _mismatch(key, None, recorded)
            if problem is not None:
                raise DamagedFileError(f"{weights}: {problem}: {together}")
            raise _different(weights, f"tensor {key!r} has no place in {kind}")
        if tuple(state[key].shape) != shape:
            problem = _mismatch(key, shape, recorded)
            if problem is not None:
                raise DamagedFileError(f"{weights}: {problem}: {together}")
            raise DamagedFileError(
                f"{weights}: tensor {key!r} has shape {shape} but {kind} expects "
                f"{tuple(state[key].shape)}; the checkpoint belongs to another model"
            )


def _check_complete(
    model: nn.Module, stored: dict[str, tuple[str, tuple[int, ...]]], weights: Path
) -> None:
    """Every tensor of ``model`` is in the file: itself, or a tensor sharing its storage (tied
    tensors are saved once)."""
    groups: dict[tuple, set[str]] = {}
    for key, tensor in model.state_dict().items():
        groups.setdefault((tensor.device, tensor.data_ptr(), tuple(tensor.shape)), set()).add(key)
    for keys in groups.values():
        if not keys & stored.keys():
            raise DamagedFileError(
                f"{weights}: tensor {sorted(keys)[0]!r} of {type(model).__name__} is missing: "
                "the file is incomplete or belongs to another model"
            )


def _check_weights(
    model: nn.Module,
    stored: dict[str, tuple[str, tuple[int, ...]]],
    weights: Path,
    info: dict[str, Any],
    info_path: Path,
) -> None:
    """Compare the safetensors header with ``model.state_dict()`` (names and shapes) and the
    recorded parameter count with the model's; contradictions with ``plrd.json`` are named."""
    _check_stored(model, stored, weights, {e["name"]: e for e in info["layers"]})
    _check_complete(model, stored, weights)
    expected = info.get("num_parameters")
    if expected is not None and expected != count_parameters(model):
        raise DamagedFileError(
            f"{info_path}: records {expected:,} parameters but {type(model).__name__} with the "
            f"recorded layers has {count_parameters(model):,}; the checkpoint belongs to a "
            "differently configured model (e.g. tied vs untied embeddings)"
        )


def _swap_in_placeholders(
    model: nn.Module,
    info: dict[str, Any],
    stored: dict[str, tuple[str, tuple[int, ...]]],
    weights: Path,
    info_path: Path,
) -> None:
    """Replace the recorded layers by uninitialised ``LowRankLinear`` of the recorded rank and
    check the file against the result; on any error the original layers are put back."""
    originals: dict[str, nn.Module] = {}
    try:
        for entry in info["layers"]:
            module = model.get_submodule(entry["name"])
            originals[entry["name"]] = module
            set_submodule(model, entry["name"], _placeholder(module, entry))
        _check_weights(model, stored, weights, info, info_path)
    except Exception:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise


def load(directory: str | os.PathLike, model: nn.Module, verify: bool = True) -> nn.Module:
    """Load a ``plrd.save`` checkpoint into ``model`` (built with the same architecture).

    Checks, in order: ``plrd.json`` is well formed; ``model.safetensors`` is structurally
    complete (a truncated file is named as such); with ``verify`` (default) its size and SHA-256
    match the info's record (skip with ``verify=False`` only for files you modified on
    purpose); every recorded layer exists in ``model`` with the recorded shape and bias, and no
    unrecorded layer is factored; the tensor names and shapes in the weights file match the
    model with the recorded ranks. Then the recorded layers are replaced by ``LowRankLinear``
    of the recorded rank on the model's device and dtype, and the weights are loaded strictly.
    Raises ``DamagedFileError`` naming the file (and the layer) on any problem with the files or
    their fit to ``model`` (``InputError`` for bad arguments), before any weight is touched
    (``model`` is left as it was). Returns ``model`` (modified in place).
    """
    check_module(model, "plrd.load")
    if not isinstance(verify, bool):
        raise InputError(f"verify must be True or False, got {verify!r}; pass a bool")
    directory = as_dir(directory, "plrd.load")
    info = read_info(directory)
    info_path = directory / INFO_FILE
    weights = _weights_file(directory)
    stored = read_safetensors_header(weights)
    record = info.get("weights")
    if verify and record is not None:
        check_record(weights, record["bytes"], record["sha256"])
    _check_against(model, info, info_path)
    _swap_in_placeholders(model, info, stored, weights, info_path)
    ref = next(model.parameters(), None)
    device = str(ref.device) if ref is not None else "cpu"
    try:
        safetensors.torch.load_model(model, str(weights), strict=True, device=device)
    except Exception as e:  # the checks above make this rare; name the file all the same
        raise DamagedFileError(f"{weights}: cannot be loaded ({e}); re-save or restore it") from e
    return model
