"""The checkpoint info, ``plrd.json``: which layers are factored, and the weights file's record.

A checkpoint directory holds ``model.safetensors`` (``WEIGHTS_FILE``) and ``plrd.json``
(``INFO_FILE``)::

    {"format": "plrd", "format_version": 2, "plrd_version": "...", "dtype": "float32",
     "num_parameters": 123456,
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "in": 64, "out": 64, "rank": 12,
                 "bias": false}, ...],
     "weights": {"file": "model.safetensors", "bytes": 493872, "sha256": "3f5a..."}}

``layers`` lets ``plrd.load`` rebuild the same structure on a freshly built dense model;
``weights`` (size and SHA-256) lets it refuse a corrupt or swapped weights file. Format
version 1 (no ``weights`` record) is still read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

import plrd
from plrd.core.counting import count_parameters
from plrd.core.kinds import is_lowrank
from plrd.errors import DamagedFileError, InputError
from plrd.io.integrity import is_sha256

FORMAT = "plrd"
FORMAT_VERSION = 2
INFO_FILE = "plrd.json"
WEIGHTS_FILE = "model.safetensors"
RESAVE = "re-save the checkpoint"


def as_dir(directory: Any, call: str) -> Path:
    """``directory`` as a Path; InputError naming ``call`` unless it is a str or PathLike."""
    if not isinstance(directory, (str, os.PathLike)):
        raise InputError(
            f"{call} needs a directory path (str or os.PathLike), got {type(directory).__name__}"
        )
    return Path(directory)


def _dtype_name(model: nn.Module) -> str:
    """The most common floating dtype of the parameters, e.g. ``"float32"`` (``"none"``)."""
    counts = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    if not counts:
        return "none"
    return str(counts.most_common(1)[0][0]).removeprefix("torch.")


def model_info(model: nn.Module) -> dict[str, Any]:
    """The ``plrd.json`` content describing ``model``'s factored layers (no weights record)."""
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
        "plrd_version": plrd.__version__,
        "dtype": _dtype_name(model),
        "num_parameters": count_parameters(model),
        "layers": layers,
    }


def _info_missing(directory: Path, path: Path) -> ValueError:
    """The error for a directory without ``plrd.json``: not a checkpoint (InputError), or one
    whose save was interrupted (DamagedFileError)."""
    if not directory.is_dir():
        return InputError(
            f"{directory} does not exist (or is not a directory): no checkpoint; pass the "
            "directory plrd.save wrote"
        )
    if (directory / WEIGHTS_FILE).is_file():
        return DamagedFileError(
            f"{path} not found beside {WEIGHTS_FILE}: the save was interrupted or the info file "
            f"was deleted; the weights cannot be trusted, {RESAVE}"
        )
    return InputError(
        f"{path} not found: {directory} is not a plrd checkpoint (write one with plrd.save)"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_weights_record(path: Path, record: Any) -> None:
    ok = (
        isinstance(record, dict)
        and record.get("file") == WEIGHTS_FILE
        and _is_int(record.get("bytes"))
        and record["bytes"] >= 0
        and is_sha256(record.get("sha256"))
    )
    if not ok:
        raise DamagedFileError(
            f'{path}: "weights" = {record!r} needs file "{WEIGHTS_FILE}", bytes (int) and '
            f"sha256 (64 hex digits): the file is damaged; {RESAVE}"
        )


def _check_layer_entries(path: Path, layers: Any) -> None:
    if not isinstance(layers, list):
        raise DamagedFileError(f'{path}: "layers" must be a list; the file is damaged, {RESAVE}')
    seen = set()
    for i, entry in enumerate(layers):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and all(_is_int(entry.get(k)) for k in ("in", "out", "rank"))
            and isinstance(entry.get("bias"), bool)
        )
        if not ok:
            raise DamagedFileError(
                f"{path}: layers[{i}] = {entry!r} needs name (str), in, out, rank (int), "
                f"bias (bool); the file is damaged, {RESAVE}"
            )
        if entry["name"] in seen:
            raise DamagedFileError(
                f"{path}: layer {entry['name']!r} is listed twice; the file is damaged, {RESAVE}"
            )
        seen.add(entry["name"])


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(
            f"{path}: cannot be read as JSON ({e}): the file is damaged; {RESAVE}"
        ) from e


def _check_version(path: Path, info: Any) -> int:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DamagedFileError(
            f'{path}: not a plrd checkpoint info file (missing "format": "{FORMAT}"); {RESAVE}'
        )
    version = info.get("format_version")
    if not _is_int(version) or version < 1:
        raise DamagedFileError(
            f"{path}: format_version {version!r} is not a format version (1, 2, ...); the file "
            f"is damaged, {RESAVE}"
        )
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path}: format_version {version!r} is not supported (this plrd reads up to "
            f"{FORMAT_VERSION}); upgrade plrd"
        )
    return version


def read_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``directory/plrd.json`` and check its structure; return it.

    Raises DamagedFileError naming the file when it is missing beside the weights, is not JSON,
    or has a malformed field; InputError when ``directory`` is not a checkpoint at all or the
    file is of a newer format than this plrd reads.
    """
    directory = as_dir(directory, "plrd.io.info.read_info")
    path = directory / INFO_FILE
    if not path.is_file():
        raise _info_missing(directory, path)
    info = _load_json(path)
    version = _check_version(path, info)
    _check_layer_entries(path, info.get("layers"))
    params = info.get("num_parameters")
    if params is not None and not _is_int(params):
        raise DamagedFileError(
            f'{path}: "num_parameters" = {params!r} must be an integer; the file is damaged, '
            f"{RESAVE}"
        )
    if version >= 2:
        _check_weights_record(path, info.get("weights"))
    return info
