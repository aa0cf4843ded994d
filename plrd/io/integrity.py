"""File integrity: SHA-256 digests and a structural check of ``.safetensors`` files.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype": ..., "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer (offsets relative to its start). A complete file is exactly
``8 + N + max(end)`` bytes and each tensor spans ``prod(shape)·itemsize`` bytes. Checking this
before loading turns a truncated or garbled file into a ``DamagedFileError`` naming the file,
instead of an error from deep inside the loader.

Every error raised here is a ``plrd.errors.DamagedFileError`` (a ``ValueError``) whose message
starts with the file's path and ends with what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from plrd.errors import DamagedFileError

CHUNK_BYTES = 1 << 20
"""Read size for hashing."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors refuses headers above 100 MB; anything larger means the length word is garbage."""

_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_HEX64 = re.compile(r"[0-9a-f]{64}")

RESTORE = "re-save it or restore it from a good copy"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"file": name, "bytes": size, "sha256": hex}`` of a file, as a checkpoint records it."""
    path = Path(path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def is_sha256(value: Any) -> bool:
    """True for a lower-case 64-digit hex string."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def check_record(path: str | os.PathLike, size: int, sha256: str) -> None:
    """Raise DamagedFileError unless the file has ``size`` bytes and SHA-256 ``sha256``.

    The size is compared first (free), so a truncated file is reported as such without reading.
    """
    path = Path(path)
    actual = path.stat().st_size
    if actual != size:
        what = "truncated" if actual < size else "longer than when it was written"
        raise DamagedFileError(
            f"{path}: size mismatch (expected {size:,} bytes, got {actual:,}): the file is "
            f"{what}, so it is corrupt or was modified; {RESTORE}"
        )
    got = sha256_file(path)
    if got != sha256:
        raise DamagedFileError(
            f"{path}: checksum mismatch (expected sha256 {sha256}, got {got}): the file is "
            f"corrupt or was modified; {RESTORE}"
        )


def _entry_error(entry: Any) -> str | None:
    """Why a header entry is malformed, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has dtype {dtype!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"has data_offsets {offsets!r}"
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        return (
            f"spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs "
            f"{math.prod(shape) * itemsize}"
        )
    return None


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, after checking its structure.

    Raises DamagedFileError naming the file when it is too short, its header is not JSON or has a
    malformed entry, or its length disagrees with the header (truncated or padded file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFileError(
                f"{path}: {size} bytes is too short to be a safetensors file; {RESTORE}"
            )
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise DamagedFileError(
                f"{path}: the header length word says {length:,} bytes but the file has "
                f"{size:,}: the file is truncated or is not safetensors; {RESTORE}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(
            f"{path}: the safetensors header is not valid JSON ({e}): the file is corrupt; "
            f"{RESTORE}"
        ) from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: the safetensors header is not a JSON object; {RESTORE}")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        problem = _entry_error(entry)
        if problem is not None:
            raise DamagedFileError(
                f"{path}: header entry {key!r} {problem}: the file is corrupt; {RESTORE}"
            )
        end = max(end, entry["data_offsets"][1])
        tensors[key] = (entry["dtype"], tuple(entry["shape"]))
    data = size - 8 - length
    if data < end:
        raise DamagedFileError(
            f"{path}: the header describes {end:,} bytes of tensor data but the file holds "
            f"only {data:,}: the file is truncated (an interrupted write or copy?); {RESTORE}"
        )
    if data > end:
        raise DamagedFileError(
            f"{path}: {data - end:,} bytes follow the last tensor the header describes: the file "
            f"is corrupt or was appended to; {RESTORE}"
        )
    return tensors
