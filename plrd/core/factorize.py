"""Factorization math: pure functions on tensors, computed in float64.

A dense weight W [out, in] is replaced by ``up @ down`` with up [out, r] and down [r, in].

* Plain SVD (Eckart–Young): W = U Σ Vᵀ, keep the top r components and split Σ evenly,
  ``up = U_r √Σ_r``, ``down = √Σ_r V_rᵀ``. This minimises ‖W − up·down‖_F.
* Whitened SVD (SVD-LLM): with the input Gram G = Σ xᵀx = L Lᵀ (Cholesky), the output error on
  the calibration inputs is Σ‖(W − W')x‖² = ‖(W − W') L‖_F². Take the SVD of W L = U Σ Vᵀ and
  set ``up = U_r √Σ_r``, ``down = √Σ_r V_rᵀ L⁻¹``; the error is exactly Σ_{i>r} σ_i².
* QR-core truncation of an existing factorization P = up·down (rank r → k) without a dense SVD:
  up = Q₁R₁, downᵀ = Q₂R₂, so P = Q₁ (R₁R₂ᵀ) Q₂ᵀ; the SVD of the r×r core gives the SVD of P.
  Cost O((out + in)·r²) instead of O(out·in·min(out, in)). With a Gram, ``down`` is whitened
  (down·L) first and un-whitened after.
* Reuse: :class:`Whitening` holds one Gram's Cholesky factor for every layer reading that
  input; :func:`spectral_factors` / :func:`lowrank_spectral_factors` return a layer's spectrum
  and its top-k factors from one SVD, so the factors for any rank r ≤ k are slices.

Every function returns tensors on the input's device in float64 unless it says otherwise; the
layer code casts results back to the parameter dtype.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

RIDGE_START = 1e-8
"""First ridge tried, relative to the mean of diag(G), when G is not positive definite."""
RIDGE_MAX = 1e-1
"""Largest relative ridge tried before giving up."""


def _label(name: str | None) -> str:
    return f"layer {name!r}" if name else "layer"


def break_even_rank(in_features: int, out_features: int) -> int:
    """⌊in·out / (in + out)⌋: at this rank the factors hold as many parameters as W."""
    return (in_features * out_features) // (in_features + out_features)


def check_features(in_features: int, out_features: int, name: str | None = None) -> None:
    """Raise ValueError unless both widths are positive integers."""
    for what, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(
                f"{_label(name)}: {what}={value!r} must be a positive integer (the layer's "
                f"{'input' if what == 'in_features' else 'output'} width)"
            )


def check_rank(rank: int, out_features: int, in_features: int, name: str | None = None) -> int:
    """Return ``rank`` as an int; raise ValueError unless it is an integer in 1..min(out, in)."""
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= limit:
        raise ValueError(
            f"{_label(name)} [{out_features}x{in_features}]: rank {rank!r} is out of range; "
            f"choose an integer rank in 1..{limit} (min(out, in))"
        )
    return int(rank)


def check_finite(tensor: Tensor, what: str, name: str | None = None) -> None:
    """Raise ValueError naming the layer if ``tensor`` has NaN or ±inf entries."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{_label(name)}: {what} {tuple(tensor.shape)} has {bad} non-finite value(s); "
            f"repair or reload the weights before decomposing"
        )


def check_weight(tensor: Tensor, what: str, name: str | None = None) -> None:
    """Raise ValueError unless ``tensor`` is a materialised, finite, real floating 2-D matrix."""
    if not isinstance(tensor, Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{_label(name)}: {what} must be a 2-D tensor, got {shape}")
    if tensor.is_meta:
        raise ValueError(
            f"{_label(name)}: {what} {tuple(tensor.shape)} is on the meta device (it has no "
            "data); load the weights before decomposing"
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"{_label(name)}: {what} has dtype {tensor.dtype}; plrd factors real floating-point "
            "weights (dequantize or cast the model first)"
        )
    check_finite(tensor, what, name)


GRAM_SYMMETRY_TOL = 1e-5
"""Largest |G − Gᵀ| accepted, relative to max |G| (a Σ xᵀx is symmetric up to rounding)."""


def check_gram(gram: Tensor, in_features: int, name: str | None = None) -> None:
    """Raise ValueError unless ``gram`` looks like Σ xᵀx of the layer's inputs.

    That is: a real [in, in] tensor with data, finite, diagonal ≥ 0, symmetric up to rounding.
    """
    fix = "pass Σ xᵀx of this layer's inputs (see plrd.collect_grams)"
    if not isinstance(gram, Tensor):
        raise ValueError(
            f"{_label(name)}: Gram matrix must be a torch.Tensor, got {type(gram).__name__}; {fix}"
        )
    if gram.dim() != 2 or tuple(gram.shape) != (in_features, in_features):
        raise ValueError(
            f"{_label(name)}: Gram matrix has shape {tuple(gram.shape)} but the layer has "
            f"{in_features} input features; {fix}, shape ({in_features}, {in_features})"
        )
    if gram.is_meta or gram.is_complex() or gram.dtype == torch.bool:
        what = "is on the meta device" if gram.is_meta else f"has dtype {gram.dtype}"
        raise ValueError(f"{_label(name)}: Gram matrix {what}; {fix}")
    check_finite(gram, "Gram matrix", name)
    g = gram.double()
    diag = g.diagonal()
    if in_features and float(diag.min()) < 0:
        i = int(diag.argmin())
        raise ValueError(
            f"{_label(name)}: Gram matrix has a negative diagonal entry G[{i},{i}] = "
            f"{float(diag[i]):.3g}, so it is not Σ xᵀx; {fix}"
        )
    scale = float(g.abs().max()) if g.numel() else 0.0
    asym = float((g - g.T).abs().max()) if g.numel() else 0.0
    if asym > GRAM_SYMMETRY_TOL * scale:
        raise ValueError(
            f"{_label(name)}: Gram matrix is not symmetric (max |G - Gᵀ| = {asym:.3g}, "
            f"max |G| = {scale:.3g}); {fix}"
        )


def _split_sigma(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors from an SVD: up = U_r √Σ_r, down = √Σ_r V_rᵀ."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def cholesky_factor(gram: Tensor, name: str | None = None) -> tuple[Tensor, float]:
    """Lower-triangular L with L Lᵀ = G + λ·mean(diag G)·I, float64, and the relative ridge λ.

    λ = 0 when G is positive definite. Otherwise λ starts at ``RIDGE_START`` and grows tenfold
    until the factorization succeeds (inputs that never vary, e.g. dead features, or fewer
    tokens than features make G singular). Raises ValueError when even ``RIDGE_MAX`` fails,
    which a true Σ xᵀx never does.
    """
    g = gram.double()
    g = 0.5 * (g + g.T)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return factor, 0.0
    scale = float(g.diagonal().mean().abs())
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    ridge = RIDGE_START
    while ridge <= RIDGE_MAX:
        factor, info = torch.linalg.cholesky_ex(g + (ridge * scale) * eye)
        if int(info) == 0:
            return factor, ridge
        ridge *= 10
    raise ValueError(
        f"{_label(name)}: the Gram matrix is not positive definite even with a ridge of "
        f"{RIDGE_MAX:g}·mean(diag); collect it on more calibration tokens, or use method='svd'"
    )


@dataclass(frozen=True)
class Whitening:
    """G + λ·mean(diag G)·I = L Lᵀ for one Gram: ``lower`` = L [in, in] (float64), ``ridge`` = λ.

    Layers reading the same input share one Gram and so one whitening; computing it once and
    passing it to the functions below saves the repeated Cholesky.
    """

    lower: Tensor
    ridge: float

    @classmethod
    def of(
        cls,
        gram: Tensor,
        in_features: int,
        name: str | None = None,
        device: torch.device | str | None = None,
    ) -> Whitening:
        """Check ``gram`` (see :func:`check_gram`) and factor it on ``device``."""
        check_gram(gram, in_features, name)
        lower, ridge = cholesky_factor(gram.to(device) if device is not None else gram, name)
        return cls(lower, ridge)


def _unwhiten(down_white: Tensor, lower: Tensor) -> Tensor:
    """down_white · L⁻¹ by a triangular solve: X L = D  ⇔  Lᵀ Xᵀ = Dᵀ."""
    if down_white.shape[0] == 0:
        return down_white
    return torch.linalg.solve_triangular(lower.T, down_white.T, upper=True).T


def _check_whitening(whitening: Whitening | None, in_features: int, name: str | None) -> None:
    if whitening is not None and tuple(whitening.lower.shape) != (in_features, in_features):
        raise ValueError(
            f"{_label(name)}: whitening factor has shape {tuple(whitening.lower.shape)}, "
            f"expected ({in_features}, {in_features})"
        )


def spectral_factors(
    weight: Tensor, keep: int, whitening: Whitening | None = None, name: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One SVD of W [out, in] (or of W·L) giving both its spectrum and its best factors.

    Returns (σ [min(out, in)] descending, up [out, keep], down [keep, in]), float64, where
    ``up·down`` is the best rank-``keep`` approximation (in the whitened output norm when
    ``whitening`` is given; ``down`` is un-whitened) and the top-r slices ``up[:, :r]``,
    ``down[:r]`` are the best rank-r factors for every r ≤ ``keep``. ``keep`` may be 0
    (spectrum only, but then :func:`singular_values` is cheaper).
    """
    check_weight(weight, "weight", name)
    out_features, in_features = weight.shape
    limit = min(out_features, in_features)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 0 <= keep <= limit:
        raise ValueError(f"{_label(name)}: keep={keep!r} components, choose 0..{limit}")
    _check_whitening(whitening, in_features, name)
    matrix = weight.double()
    if whitening is not None:
        matrix = matrix @ whitening.lower.to(matrix.device)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = _split_sigma(u, s, vh, int(keep))
    if whitening is not None:
        down = _unwhiten(down, whitening.lower.to(matrix.device))
    return s, up, down


def _check_pair(up: Tensor, down: Tensor, name: str | None) -> None:
    check_weight(up, "up", name)
    check_weight(down, "down", name)
    if down.shape[0] != up.shape[1]:
        raise ValueError(
            f"{_label(name)}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on rank"
        )


def lowrank_spectral_factors(
    up: Tensor,
    down: Tensor,
    keep: int,
    whitening: Whitening | None = None,
    name: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`spectral_factors` of P = up·down [out, in] (rank r) by the QR core, no dense SVD.

    up = Q₁R₁, (down·L)ᵀ = Q₂R₂, SVD of the r×r core R₁R₂ᵀ = U_c Σ V_cᵀ; then P·L =
    (Q₁U_c) Σ (Q₂V_c)ᵀ. Returns (σ [r], up' [out, keep], down' [keep, in]) float64, keep ≤ r.
    Cost O((out + in)·r²).
    """
    _check_pair(up, down, name)
    current, in_features = down.shape
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 0 <= keep <= current:
        raise ValueError(f"{_label(name)}: keep={keep!r} components, choose 0..{current}")
    _check_whitening(whitening, in_features, name)
    up64, down64 = up.double(), down.double()
    lower = None if whitening is None else whitening.lower.to(down64.device)
    if lower is not None:
        down64 = down64 @ lower
    q1, r1 = torch.linalg.qr(up64)
    q2, r2 = torch.linalg.qr(down64.T)
    u_core, sigma, vh_core = torch.linalg.svd(r1 @ r2.T)
    new_up, new_down = _split_sigma(q1 @ u_core[:, :keep], sigma, vh_core[:keep] @ q2.T, keep)
    if lower is not None:
        new_down = _unwhiten(new_down, lower)
    return sigma, new_up, new_down


def svd_factors(weight: Tensor, rank: int, name: str | None = None) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of W [out, in] in Frobenius norm: (up [out, r], down [r, in]), fp64."""
    check_weight(weight, "weight", name)
    rank = check_rank(rank, *weight.shape, name)
    _, up, down = spectral_factors(weight, rank, None, name)
    return up, down


def whitened_svd_factors(
    weight: Tensor, rank: int, gram: Tensor, name: str | None = None
) -> tuple[tuple[Tensor, Tensor], float]:
    """Rank-r factors minimising the output error on the Gram's inputs, float64.

    Returns ((up [out, r], down [r, in]), ridge) where ridge is the relative Cholesky ridge
    (0.0 when G was positive definite). Σ‖(W − up·down)x‖² = Σ_{i>r} σ_i(W L)².
    """
    check_weight(weight, "weight", name)
    rank = check_rank(rank, *weight.shape, name)
    white = Whitening.of(gram, weight.shape[1], name, weight.device)
    _, up, down = spectral_factors(weight, rank, white, name)
    return (up, down), white.ridge


def truncate_factors(
    up: Tensor, down: Tensor, rank: int, gram: Tensor | None = None, name: str | None = None
) -> tuple[tuple[Tensor, Tensor], float]:
    """Optimal rank-k factors of P = up·down (or of its whitened optimum), no dense SVD.

    up [out, r], down [r, in] → ((up' [out, k], down' [k, in]), ridge), float64. Without a Gram
    this minimises ‖P − up'·down'‖_F; with one, Σ‖(P − up'·down')x‖² over the Gram's inputs.
    """
    _check_pair(up, down, name)
    out_features, current = up.shape
    in_features = down.shape[1]
    rank = check_rank(rank, out_features, in_features, name)
    if rank > current:
        raise ValueError(
            f"{_label(name)}: cannot truncate rank {current} up to {rank}; "
            f"choose a rank in 1..{current}"
        )
    white = None if gram is None else Whitening.of(gram, in_features, name, down.device)
    _, new_up, new_down = lowrank_spectral_factors(up, down, rank, white, name)
    return (new_up, new_down), 0.0 if white is None else white.ridge


def singular_values(
    weight: Tensor,
    gram: Tensor | None = None,
    name: str | None = None,
    whitening: Whitening | None = None,
) -> tuple[Tensor, float]:
    """Descending σ of W [out, in] (or of W·L with G = L Lᵀ), float64, and the Cholesky ridge.

    Dropping component i costs σ_i² of (whitened) output error. A precomputed ``whitening``
    replaces ``gram``.
    """
    check_weight(weight, "weight", name)
    if whitening is None and gram is not None:
        whitening = Whitening.of(gram, weight.shape[1], name, weight.device)
    _check_whitening(whitening, weight.shape[1], name)
    matrix = weight.double()
    if whitening is not None:
        matrix = matrix @ whitening.lower.to(matrix.device)
    return torch.linalg.svdvals(matrix), 0.0 if whitening is None else whitening.ridge


def lowrank_singular_values(
    up: Tensor,
    down: Tensor,
    gram: Tensor | None = None,
    name: str | None = None,
    whitening: Whitening | None = None,
) -> tuple[Tensor, float]:
    """Descending σ [r] of up·down (or up·down·L), float64, via the QR core, and the ridge."""
    _check_pair(up, down, name)
    if whitening is None and gram is not None:
        whitening = Whitening.of(gram, down.shape[1], name, down.device)
    _check_whitening(whitening, down.shape[1], name)
    down64 = down.double()
    if whitening is not None:
        down64 = down64 @ whitening.lower.to(down64.device)
    r1 = torch.linalg.qr(up.double(), mode="r")[1]
    r2 = torch.linalg.qr(down64.T, mode="r")[1]
    return torch.linalg.svdvals(r1 @ r2.T), 0.0 if whitening is None else whitening.ridge


def init_factors_(up: Tensor, down: Tensor) -> None:
    """In place: a random init whose output variance matches ``nn.Linear``'s default.

    nn.Linear draws W ~ U(±1/√in), so Var(Wx)ᵢ = E[x²]/3. Here down ~ U(±1/√in) gives
    Var(down x) = E[x²]/3 and up ~ U(±√(3/r)) (variance 1/r) keeps Var(up·down x) = E[x²]/3.
    """
    rank, in_features = down.shape
    with torch.no_grad():
        down.uniform_(-1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))
        up.uniform_(-math.sqrt(3.0 / rank), math.sqrt(3.0 / rank))
