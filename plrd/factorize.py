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

Every function returns tensors on the input's device in float64 unless it says otherwise; the
layer code casts results back to the parameter dtype.
"""

from __future__ import annotations

import math

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


def check_rank(rank: int, out_features: int, in_features: int, name: str | None = None) -> None:
    """Raise ValueError unless 1 ≤ rank ≤ min(out, in)."""
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"{_label(name)} [{out_features}x{in_features}]: rank {rank!r} is out of range; "
            f"choose an integer rank in 1..{limit} (min(out, in))"
        )


def check_finite(tensor: Tensor, what: str, name: str | None = None) -> None:
    """Raise ValueError naming the layer if ``tensor`` has NaN or ±inf entries."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{_label(name)}: {what} {tuple(tensor.shape)} has {bad} non-finite value(s); "
            f"repair or reload the weights before decomposing"
        )


def check_gram(gram: Tensor, in_features: int, name: str | None = None) -> None:
    """Raise ValueError unless ``gram`` is a finite [in, in] matrix."""
    if gram.dim() != 2 or tuple(gram.shape) != (in_features, in_features):
        raise ValueError(
            f"{_label(name)}: Gram matrix has shape {tuple(gram.shape)} but the layer has "
            f"{in_features} input features; pass Σ xᵀx of this layer's inputs, "
            f"shape ({in_features}, {in_features}) (see plrd.collect_grams)"
        )
    check_finite(gram, "Gram matrix", name)


def _split_sigma(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors from an SVD: up = U_r √Σ_r, down = √Σ_r V_rᵀ."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(weight: Tensor, rank: int, name: str | None = None) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of W [out, in] in Frobenius norm: (up [out, r], down [r, in]), fp64."""
    out_features, in_features = weight.shape
    check_rank(rank, out_features, in_features, name)
    check_finite(weight, "weight", name)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return _split_sigma(u, s, vh, rank)


def cholesky_factor(gram: Tensor, name: str | None = None) -> tuple[Tensor, float]:
    """Lower-triangular L with L Lᵀ = G + λ·mean(diag G)·I, float64, and the relative ridge λ.

    λ = 0 when G is positive definite. Otherwise λ starts at ``RIDGE_START`` and grows tenfold
    until the factorization succeeds (inputs that never vary, e.g. dead features, make G
    singular). Raises ValueError when even ``RIDGE_MAX`` fails.
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


def _unwhiten(down_white: Tensor, lower: Tensor) -> Tensor:
    """down_white · L⁻¹ by a triangular solve: X L = D  ⇔  Lᵀ Xᵀ = Dᵀ."""
    return torch.linalg.solve_triangular(lower.T, down_white.T, upper=True).T


def whitened_svd_factors(
    weight: Tensor, rank: int, gram: Tensor, name: str | None = None
) -> tuple[tuple[Tensor, Tensor], float]:
    """Rank-r factors minimising the output error on the Gram's inputs, float64.

    Returns ((up [out, r], down [r, in]), ridge) where ridge is the relative Cholesky ridge
    (0.0 when G was positive definite). Σ‖(W − up·down)x‖² = Σ_{i>r} σ_i(W L)².
    """
    out_features, in_features = weight.shape
    check_rank(rank, out_features, in_features, name)
    check_finite(weight, "weight", name)
    check_gram(gram, in_features, name)
    lower, ridge = cholesky_factor(gram.to(weight.device), name)
    u, s, vh = torch.linalg.svd(weight.double() @ lower, full_matrices=False)
    up, down_white = _split_sigma(u, s, vh, rank)
    return (up, _unwhiten(down_white, lower)), ridge


def _core_svd(up: Tensor, down_side: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SVD of P = up · down_sideᵀ, with up [m, r] and down_side [n, r], via a QR of each.

    Returns (Q₁ [m, r], U_c [r, r], σ [r], V_cᵀ [r, r], Q₂ [n, r]) with
    P = Q₁ U_c diag(σ) V_cᵀ Q₂ᵀ.
    """
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down_side)
    u_core, sigma, vh_core = torch.linalg.svd(r1 @ r2.T)
    return q1, u_core, sigma, vh_core, q2


def truncate_factors(
    up: Tensor, down: Tensor, rank: int, gram: Tensor | None = None, name: str | None = None
) -> tuple[tuple[Tensor, Tensor], float]:
    """Optimal rank-k factors of P = up·down (or of its whitened optimum), no dense SVD.

    up [out, r], down [r, in] → ((up' [out, k], down' [k, in]), ridge), float64. Without a Gram
    this minimises ‖P − up'·down'‖_F; with one, Σ‖(P − up'·down')x‖² over the Gram's inputs.
    """
    out_features, current = up.shape
    in_features = down.shape[1]
    if down.shape[0] != current:
        raise ValueError(
            f"{_label(name)}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on rank"
        )
    check_rank(rank, out_features, in_features, name)
    if rank > current:
        raise ValueError(
            f"{_label(name)}: cannot truncate rank {current} up to {rank}; "
            f"choose a rank in 1..{current}"
        )
    check_finite(up, "up", name)
    check_finite(down, "down", name)
    up64, down64 = up.double(), down.double()
    lower, ridge = None, 0.0
    if gram is not None:
        check_gram(gram, in_features, name)
        lower, ridge = cholesky_factor(gram.to(up.device), name)
        down64 = down64 @ lower
    q1, u_core, sigma, vh_core, q2 = _core_svd(up64, down64.T)
    new_up, new_down = _split_sigma(q1 @ u_core, sigma, vh_core @ q2.T, rank)
    if lower is not None:
        new_down = _unwhiten(new_down, lower)
    return (new_up, new_down), ridge


def singular_values(
    weight: Tensor, gram: Tensor | None = None, name: str | None = None
) -> tuple[Tensor, float]:
    """Descending σ of W [out, in] (or of W·L with G = L Lᵀ), float64, and the Cholesky ridge.

    Dropping component i costs σ_i² of (whitened) output error.
    """
    check_finite(weight, "weight", name)
    matrix, ridge = weight.double(), 0.0
    if gram is not None:
        check_gram(gram, weight.shape[1], name)
        lower, ridge = cholesky_factor(gram.to(weight.device), name)
        matrix = matrix @ lower
    return torch.linalg.svdvals(matrix), ridge


def lowrank_singular_values(
    up: Tensor, down: Tensor, gram: Tensor | None = None, name: str | None = None
) -> tuple[Tensor, float]:
    """Descending σ [r] of up·down (or up·down·L), float64, via the QR core, and the ridge."""
    check_finite(up, "up", name)
    check_finite(down, "down", name)
    down64, ridge = down.double(), 0.0
    if gram is not None:
        check_gram(gram, down.shape[1], name)
        lower, ridge = cholesky_factor(gram.to(down.device), name)
        down64 = down64 @ lower
    r1 = torch.linalg.qr(up.double(), mode="r")[1]
    r2 = torch.linalg.qr(down64.T, mode="r")[1]
    return torch.linalg.svdvals(r1 @ r2.T), ridge


def init_factors_(up: Tensor, down: Tensor) -> None:
    """In place: a random init whose output variance matches ``nn.Linear``'s default.

    nn.Linear draws W ~ U(±1/√in), so Var(Wx)ᵢ = E[x²]/3. Here down ~ U(±1/√in) gives
    Var(down x) = E[x²]/3 and up ~ U(±√(3/r)) (variance 1/r) keeps Var(up·down x) = E[x²]/3.
    """
    rank, in_features = down.shape
    with torch.no_grad():
        down.uniform_(-1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))
        up.uniform_(-math.sqrt(3.0 / rank), math.sqrt(3.0 / rank))
