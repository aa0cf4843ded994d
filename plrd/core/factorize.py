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
layer code casts results back to the parameter dtype. Inputs are checked by ``plrd.core.checks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from plrd.core.checks import check_gram, check_keep, check_pair, check_rank, check_weight, label
from plrd.errors import InputError

RIDGE_START = 1e-8
"""First ridge tried, relative to the mean of diag(G), when G is not positive definite."""
RIDGE_MAX = 1e-1
"""Largest relative ridge tried before giving up."""


def break_even_rank(in_features: int, out_features: int) -> int:
    """⌊in·out / (in + out)⌋: at this rank the factors hold as many parameters as W."""
    return (in_features * out_features) // (in_features + out_features)


def _split_sigma(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors from an SVD: up = U_r √Σ_r, down = √Σ_r V_rᵀ."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def cholesky_factor(gram: Tensor, name: str | None = None) -> tuple[Tensor, float]:
    """Lower-triangular L with L Lᵀ = G + λ·mean(diag G)·I, float64, and the relative ridge λ.

    λ = 0 when G is positive definite. Otherwise λ starts at ``RIDGE_START`` and grows tenfold
    until the factorization succeeds (inputs that never vary, e.g. dead features, or fewer
    tokens than features make G singular). Raises InputError when even ``RIDGE_MAX`` fails,
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
    raise InputError(
        f"{label(name)}: the Gram matrix is not positive definite even with a ridge of "
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
        raise InputError(
            f"{label(name)}: whitening factor has shape {tuple(whitening.lower.shape)}, "
            f"expected ({in_features}, {in_features}); build it from this layer's Gram with "
            "Whitening.of"
        )


def spectral_factors(
    weight: Tensor, keep: int, whitening: Whitening | None = None, name: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One SVD of W [out, in] (or of W·L) giving both its spectrum and its best factors.

    Returns (σ [min(out, in)] descending, up [out, keep], down [keep, in]), float64, where
    ``up·down`` is the best rank-``keep`` approximation (in the whitened output norm when
    ``whitening`` is given; ``down`` is un-whitened) and the top-r slices ``up[:, :r]``,
    ``down[:r]`` are the best rank-r factors for every r ≤ ``keep``. ``keep`` may be 0
    (the spectrum only).
    """
    check_weight(weight, "weight", name)
    out_features, in_features = weight.shape
    keep = check_keep(keep, min(out_features, in_features), name)
    _check_whitening(whitening, in_features, name)
    matrix = weight.double()
    if whitening is not None:
        matrix = matrix @ whitening.lower.to(matrix.device)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = _split_sigma(u, s, vh, keep)
    if whitening is not None:
        down = _unwhiten(down, whitening.lower.to(matrix.device))
    return s, up, down


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
    check_pair(up, down, name)
    current, in_features = down.shape
    keep = check_keep(keep, current, name)
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
    check_pair(up, down, name)
    out_features, current = up.shape
    in_features = down.shape[1]
    rank = check_rank(rank, out_features, in_features, name)
    if rank > current:
        raise InputError(
            f"{label(name)}: cannot truncate rank {current} up to {rank}; "
            f"choose a rank in 1..{current}"
        )
    white = None if gram is None else Whitening.of(gram, in_features, name, down.device)
    _, new_up, new_down = lowrank_spectral_factors(up, down, rank, white, name)
    return (new_up, new_down), 0.0 if white is None else white.ridge


def refit_up(
    down: Tensor, up: Tensor, weight_cross: Tensor, gram: Tensor, damping: float
) -> Tensor:
    """up' [out, r] = (W C downᵀ + λ up)(down G downᵀ + λ I)⁻¹, float64, with ``down`` fixed.

    For a layer W whose inputs in the uncut model are x_p and in the partly cut model x_c (same
    tokens), G = Σ x_c x_cᵀ [in, in] and C = Σ x_p x_cᵀ; ``weight_cross`` = W C [out, in]. Then
    up' minimises Σ‖up'·down x_c − W x_p‖² + λ‖up' − up‖²: the factored layer that, from the
    inputs it will really see, best reproduces what the uncut layer computed (SVD-LLM's update
    of ``up``). λ = ``damping``·mean(diag(down G downᵀ)) keeps it near ``up`` where the
    calibration tokens say little.
    """
    d = down.double()
    gram_z = d @ gram.double().to(d.device) @ d.T
    target = weight_cross.double().to(d.device) @ d.T
    if not damping >= 0 or not math.isfinite(damping):
        raise InputError(f"damping must be a number >= 0, got {damping!r}")
    scale = float(gram_z.diagonal().mean().abs()) or 1.0
    ridge = damping * scale
    eye = torch.eye(gram_z.shape[0], dtype=gram_z.dtype, device=gram_z.device)
    # up' (A + λI) = B + λ up  ⇔  (A + λI) up'ᵀ = (B + λ up)ᵀ  (A symmetric)
    return torch.linalg.solve(gram_z + ridge * eye, (target + ridge * up.double()).T).T


def init_factors_(up: Tensor, down: Tensor) -> None:
    """In place: a random init whose output variance matches ``nn.Linear``'s default.

    nn.Linear draws W ~ U(±1/√in), so Var(Wx)ᵢ = E[x²]/3. Here down ~ U(±1/√in) gives
    Var(down x) = E[x²]/3 and up ~ U(±√(3/r)) (variance 1/r) keeps Var(up·down x) = E[x²]/3.
    """
    rank, in_features = down.shape
    with torch.no_grad():
        down.uniform_(-1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))
        up.uniform_(-math.sqrt(3.0 / rank), math.sqrt(3.0 / rank))
