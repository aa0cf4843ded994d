"""Checks of what the factorization reads: layer widths, ranks, weights and Gram matrices.

Each raises ``plrd.errors.InputError`` (a ``ValueError``) with one line naming the layer, the
value and the fix, before any work is done.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from plrd.errors import InputError

GRAM_SYMMETRY_TOL = 1e-5
"""Largest |G − Gᵀ| accepted, relative to max |G| (a Σ xᵀx is symmetric up to rounding)."""

_GRAM_FIX = "pass Σ xᵀx of this layer's inputs (see plrd.collect_grams)"


def check_module(model: Any, call: str) -> None:
    """``model`` is a ``torch.nn.Module``; ``call`` names the function in the message."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{call} needs a torch.nn.Module as model, got {type(model).__name__}; pass the "
            "model object itself"
        )


def label(name: str | None) -> str:
    """``layer 'name'`` (or ``layer`` when unnamed), the subject of error messages."""
    return f"layer {name!r}" if name else "layer"


def is_count(value: object) -> bool:
    """True for an integer that is not a bool (``True`` is not a width or a rank)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_features(in_features: int, out_features: int, name: str | None = None) -> None:
    """Raise InputError unless both widths are positive integers."""
    for what, value in (("in_features", in_features), ("out_features", out_features)):
        if not is_count(value) or value < 1:
            side = "input" if what == "in_features" else "output"
            raise InputError(
                f"{label(name)}: {what}={value!r} must be a positive integer (the layer's "
                f"{side} width)"
            )


def check_rank(rank: int, out_features: int, in_features: int, name: str | None = None) -> int:
    """Return ``rank`` as an int; raise InputError unless it is an integer in 1..min(out, in)."""
    limit = min(out_features, in_features)
    if not is_count(rank) or not 1 <= rank <= limit:
        raise InputError(
            f"{label(name)} [{out_features}x{in_features}]: rank {rank!r} is out of range; "
            f"choose an integer rank in 1..{limit} (min(out, in))"
        )
    return int(rank)


def check_keep(keep: int, limit: int, name: str | None = None) -> int:
    """Return ``keep`` (a number of singular components) as an int; InputError unless in
    0..``limit``."""
    if not is_count(keep) or not 0 <= keep <= limit:
        raise InputError(f"{label(name)}: keep={keep!r} components, choose 0..{limit}")
    return int(keep)


def check_finite(tensor: Tensor, what: str, name: str | None = None) -> None:
    """Raise InputError naming the layer if ``tensor`` has NaN or ±inf entries."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(
            f"{label(name)}: {what} {tuple(tensor.shape)} has {bad} non-finite value(s); "
            "repair or reload the weights before decomposing"
        )


def check_weight(tensor: Tensor, what: str, name: str | None = None) -> None:
    """Raise InputError unless ``tensor`` is a materialised, finite, real floating 2-D matrix."""
    if not isinstance(tensor, Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise InputError(
            f"{label(name)}: {what} must be a 2-D tensor, got {shape}; pass the layer's matrix"
        )
    if tensor.is_meta:
        raise InputError(
            f"{label(name)}: {what} {tuple(tensor.shape)} is on the meta device (it has no "
            "data); load the weights before decomposing"
        )
    if not tensor.is_floating_point():
        raise InputError(
            f"{label(name)}: {what} has dtype {tensor.dtype}; plrd factors real floating-point "
            "weights (dequantize or cast the model first)"
        )
    check_finite(tensor, what, name)


def check_pair(up: Tensor, down: Tensor, name: str | None = None) -> None:
    """Raise InputError unless up [out, r] and down [r, in] are good weights of one rank r."""
    check_weight(up, "up", name)
    check_weight(down, "down", name)
    if down.shape[0] != up.shape[1]:
        raise InputError(
            f"{label(name)}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on rank; "
            "pass up [out, r] and down [r, in] of one rank r"
        )


def _check_gram_kind(gram: Tensor, in_features: int, name: str | None) -> None:
    """A real [in, in] tensor holding data."""
    if not isinstance(gram, Tensor):
        raise InputError(
            f"{label(name)}: Gram matrix must be a torch.Tensor, got {type(gram).__name__}; "
            f"{_GRAM_FIX}"
        )
    if gram.dim() != 2 or tuple(gram.shape) != (in_features, in_features):
        raise InputError(
            f"{label(name)}: Gram matrix has shape {tuple(gram.shape)} but the layer has "
            f"{in_features} input features; {_GRAM_FIX}, shape ({in_features}, {in_features})"
        )
    if gram.is_meta or gram.is_complex() or gram.dtype == torch.bool:
        what = "is on the meta device" if gram.is_meta else f"has dtype {gram.dtype}"
        raise InputError(f"{label(name)}: Gram matrix {what}; {_GRAM_FIX}")


def check_gram(gram: Tensor, in_features: int, name: str | None = None) -> None:
    """Raise InputError unless ``gram`` looks like G = Σ xᵀx of the layer's inputs.

    That is: a real [in, in] tensor with data, finite, diag(G) ≥ 0, and |G − Gᵀ| ≤
    ``GRAM_SYMMETRY_TOL``·max|G| (symmetric up to rounding).
    """
    _check_gram_kind(gram, in_features, name)
    check_finite(gram, "Gram matrix", name)
    if gram.numel() == 0:
        return
    g = gram.double()
    diag = g.diagonal()
    if float(diag.min()) < 0:
        i = int(diag.argmin())
        raise InputError(
            f"{label(name)}: Gram matrix has a negative diagonal entry G[{i},{i}] = "
            f"{float(diag[i]):.3g}, so it is not Σ xᵀx; {_GRAM_FIX}"
        )
    scale = float(g.abs().max())
    asym = float((g - g.T).abs().max())
    if asym > GRAM_SYMMETRY_TOL * scale:
        raise InputError(
            f"{label(name)}: Gram matrix is not symmetric (max |G - Gᵀ| = {asym:.3g}, "
            f"max |G| = {scale:.3g}); {_GRAM_FIX}"
        )
