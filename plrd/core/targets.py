"""Which layers of a model are decomposed: layer kinds and PEFT-style name patterns.

The linear layer kinds (``nn.Linear``, Hugging Face ``Conv1D``, ``LowRankLinear``) are defined
in ``plrd.core.kinds``.

Default targets: every linear layer except output heads and anything tied to an embedding
(``lm_head``, the module returned by ``get_output_embeddings()``, any layer whose weight shares
storage with an ``nn.Embedding`` weight).

Patterns (``targets`` / ``exclude``): a string or a list of strings (any-of). A string with a
character only regular expressions use (``\\ ^ $ ( ) { } + |``) is matched with
``re.fullmatch``; otherwise it is an ``fnmatch`` glob, tried as a regular expression instead
when as a glob it matches no layer. Either way it is tried against the qualified module name
and against each of its dotted suffixes, so ``"q_proj"``, ``"self_attn.*"``, ``".*q_proj"``
and ``r".*\\.(q|v)_proj"`` all select ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from plrd.core.kinds import is_linear_like
from plrd.errors import InputError

Patterns = str | Iterable[str] | None

_REGEX_CHARS = set("\\^$(){}+|")
_HEAD_NAMES = ("lm_head",)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All linear-like layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if name and is_linear_like(m)}


def _embedding_storages(model: nn.Module) -> set[tuple[int, tuple[int, ...]]]:
    keys = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            w = module.weight
            keys.add((w.data_ptr(), tuple(w.shape)))
    return keys


def head_names(model: nn.Module) -> set[str]:
    """Names of linear layers that are output heads or tied to an embedding."""
    layers = linear_layers(model)
    heads = {n for n in layers if n.split(".")[-1] in _HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out_emb = get_out()
        except (AttributeError, NotImplementedError):
            out_emb = None
        if out_emb is not None:
            heads.update(n for n, m in layers.items() if m is out_emb)
    emb = _embedding_storages(model)
    for name, m in layers.items():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            if (w.data_ptr(), tuple(w.shape)) in emb or (
                w.data_ptr(),
                tuple(w.t().shape),
            ) in emb:
                heads.add(name)
    return heads


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, Iterable):
        raise InputError(
            f"layer patterns must be a string or a list of strings, got {patterns!r}; "
            'e.g. targets="mlp.*" or targets=["q_proj", "v_proj"]'
        )
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise InputError(
                f"layer patterns must be strings, got {p!r} in {out!r}; "
                'e.g. targets=["q_proj", "v_proj"]'
            )
    return out


def looks_like_regex(pattern: str) -> bool:
    """True when ``pattern`` has a character only a regular expression uses (``\\ ^ $ ( ) { }
    + |``)."""
    return bool(_REGEX_CHARS & set(pattern))


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _regex(pattern: str) -> Callable[[str], bool]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise InputError(
            f"invalid layer pattern {pattern!r}: {e}; fix the regular expression or write a "
            "glob such as 'mlp.*'"
        ) from e
    return lambda name: any(rx.fullmatch(s) for s in _suffixes(name))


def _glob(pattern: str) -> Callable[[str], bool]:
    return lambda name: any(fnmatch.fnmatchcase(s, pattern) for s in _suffixes(name))


def pattern_matcher(pattern: str, names: Iterable[str]) -> Callable[[str], bool]:
    """A predicate on qualified names for ``pattern`` (see the module docs).

    Regex-only characters make it a regular expression; otherwise it is a glob, and a glob that
    matches none of ``names`` is tried as a regular expression instead (so ``".*q_proj"``
    works as intended while ``"layers.1.*"`` stays a glob and does not select layer 10).
    """
    if looks_like_regex(pattern):
        return _regex(pattern)
    glob = _glob(pattern)
    names = list(names)
    if any(glob(n) for n in names):
        return glob
    try:
        return _regex(pattern)
    except InputError:
        return glob


def _preview(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return shown + more


def find_targets(
    model: nn.Module, targets: Patterns = None, exclude: Patterns = None
) -> dict[str, nn.Module]:
    """The layers to decompose, by qualified name, in module order.

    ``targets=None`` selects every linear layer except heads/tied layers (see module docs);
    explicit ``targets`` may also select an untied head but never a layer tied to an embedding.
    ``exclude`` then removes layers; an exclude pattern matching nothing is ignored (one list can
    serve several architectures). Raises ``InputError`` when a target pattern matches no linear
    layer (the message lists the available names) or when the selection is empty.
    """
    layers = linear_layers(model)
    heads = head_names(model)
    target_list = _as_list(targets)
    exclude_list = _as_list(exclude)
    if not layers:
        raise InputError(
            f"{type(model).__name__} has no nn.Linear, Conv1D or LowRankLinear layer to "
            "decompose; plrd factors linear layers only, pass a model that has some"
        )
    if targets is None:
        chosen = {n: m for n, m in layers.items() if n not in heads}
    else:
        emb = _embedding_storages(model)
        eligible = {
            n: m
            for n, m in layers.items()
            if not (
                isinstance(getattr(m, "weight", None), torch.Tensor)
                and (m.weight.data_ptr(), tuple(m.weight.shape)) in emb
            )
        }
        keep = [pattern_matcher(p, eligible) for p in target_list]
        for p, match in zip(target_list, keep, strict=True):
            if not any(match(n) for n in eligible):
                raise InputError(
                    f"target pattern {p!r} matches no linear layer of {type(model).__name__}; "
                    f"available layers: {_preview(eligible)}"
                )
        chosen = {n: m for n, m in eligible.items() if any(match(n) for match in keep)}
    drop = [pattern_matcher(p, layers) for p in exclude_list]
    chosen = {n: m for n, m in chosen.items() if not any(match(n) for match in drop)}
    if not chosen:
        raise InputError(
            f"no layer left to decompose in {type(model).__name__} after targets={targets!r}, "
            f"exclude={exclude!r}; available layers: {_preview(layers)}"
        )
    return chosen
