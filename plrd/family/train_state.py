"""The resumable state of a training stage on disk, without pickle.

A stage's checkpoint directory (``<work_dir>/checkpoint``) holds the model as ``plrd.save``
writes it and the training state: ``train_state.safetensors`` (every tensor: optimizer moments,
RNG states) and ``train_state.json`` (everything else, with the tensors file's size and SHA-256,
checked before it is read). The directory is written whole and renamed into place, so a kill
leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plrd.errors import DamagedFileError
from plrd.io.atomic import atomic_dir, write_text
from plrd.io.checkpoint import save
from plrd.io.integrity import check_record, file_record, read_safetensors_header

CHECKPOINT = "checkpoint"
STATE = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


def checkpoint_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / CHECKPOINT


def has_checkpoint(work_dir: str | Path) -> bool:
    return (checkpoint_dir(work_dir) / STATE).is_file()


def rng_state() -> dict:
    """The torch, Python (and CUDA) random generators' states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_tensors(obj: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    """A JSON-ready copy of ``obj`` whose tensors are moved into ``tensors`` (by path)."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep them as pairs
        items = [[k, _split_tensors(v, tensors, f"{path}.{k}")] for k, v in obj.items()]
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [_split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a training state")


def _join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``_split_tensors``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join_tensors(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    return obj


def write_state(directory: Path, state: dict) -> None:
    """``state`` (nested dicts/lists of tensors and plain values) as safetensors + JSON."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    tree = _split_tensors(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    record = file_record(directory / STATE_TENSORS)
    write_text(directory / STATE, json.dumps({"tensors": record, "state": tree}) + "\n")


def _read_tree(directory: Path) -> tuple[dict, dict]:
    path = directory / STATE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc["tensors"], doc["state"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DamagedFileError(
            f"{path}: cannot be read ({err}); the checkpoint is damaged"
        ) from None


def _check_tensors_file(directory: Path, record: Any) -> Path:
    tensors_path = directory / STATE_TENSORS
    if not tensors_path.is_file():
        raise DamagedFileError(f"{tensors_path} not found; the checkpoint is incomplete")
    try:
        check_record(tensors_path, record["bytes"], record["sha256"])
    except (KeyError, TypeError):
        raise DamagedFileError(
            f"{directory / STATE}: no valid record of {STATE_TENSORS}; damaged"
        ) from None
    read_safetensors_header(tensors_path)
    return tensors_path


def verify_state(directory: Path) -> None:
    """Check the training state files in ``directory`` without loading the tensors
    (``DamagedFileError`` naming the file)."""
    record, _ = _read_tree(directory)
    _check_tensors_file(directory, record)


def read_state(directory: Path) -> dict:
    """The state written by ``write_state``; ``DamagedFileError`` naming the file if damaged."""
    from safetensors.torch import load_file

    record, tree = _read_tree(directory)
    tensors_path = _check_tensors_file(directory, record)
    return _join_tensors(tree, load_file(str(tensors_path)))


def save_checkpoint(work_dir: Path, model: torch.nn.Module, state: dict) -> None:
    """Write the model (``plrd.save``) and ``state`` into ``work_dir/checkpoint`` atomically."""
    with atomic_dir(checkpoint_dir(work_dir)) as tmp:
        save(model, tmp)
        write_state(tmp, state)
