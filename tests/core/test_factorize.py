"""Factorization math: optimality against dense SVD, whitening, QR-core truncation, errors."""

import pytest
import torch

from plrd.core.factorize import (
    break_even_rank,
    cholesky_factor,
    lowrank_spectral_factors,
    svd_factors,
    truncate_factors,
    whitened_svd_factors,
)
from plrd.errors import InputError


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) @ (mixing * scales)


def _weight(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _whitened_sigma(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Reference: descending σ of W·L with G = L Lᵀ (G positive definite)."""
    return torch.linalg.svdvals(weight @ torch.linalg.cholesky(gram))


def test_break_even_rank():
    assert break_even_rank(576, 1536) == 576 * 1536 // (576 + 1536)
    assert break_even_rank(4, 4) == 2


def test_svd_factors_reach_eckart_young_and_are_balanced():
    weight = _weight(40, 30)
    sigma = torch.linalg.svdvals(weight)
    for rank in (1, 7, 30):
        up, down = svd_factors(weight, rank)
        error = torch.linalg.matrix_norm(weight - up @ down) ** 2
        assert torch.allclose(error, (sigma[rank:] ** 2).sum(), atol=1e-9)
        # balanced: both factors carry √σ, so their column/row norms agree
        assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-9)


def test_whitened_factors_reach_whitened_optimum_and_beat_plain_svd():
    weight, x = _weight(24, 32), _correlated_inputs(500, 32)
    gram = x.T @ x
    for rank in (2, 8, 16):
        (up, down), ridge = whitened_svd_factors(weight, rank, gram)
        assert ridge == 0.0
        whitened_error = ((x @ (weight - up @ down).T) ** 2).sum()
        sigma = _whitened_sigma(weight, gram)
        assert torch.allclose(whitened_error, (sigma[rank:] ** 2).sum(), rtol=1e-6)
        plain_up, plain_down = svd_factors(weight, rank)
        plain_error = ((x @ (weight - plain_up @ plain_down).T) ** 2).sum()
        assert whitened_error < plain_error


def test_truncate_equals_dense_optimum():
    up0, down0 = _weight(50, 12, seed=2), _weight(12, 40, seed=3)
    product = up0 @ down0
    sigma = torch.linalg.svdvals(product)
    (up, down), _ = truncate_factors(up0, down0, 5)
    assert torch.allclose(up @ down, _dense_rank_k(product, 5), atol=1e-9)
    error = torch.linalg.matrix_norm(product - up @ down) ** 2
    assert torch.allclose(error, (sigma[5:] ** 2).sum(), rtol=1e-9)
    core_sigma, no_up, no_down = lowrank_spectral_factors(up0, down0, 0)  # QR core, no dense SVD
    assert torch.allclose(core_sigma, sigma[:12], rtol=1e-9)
    assert no_up.shape == (50, 0) and no_down.shape == (0, 40)


def test_whitened_truncate_equals_whitened_dense_optimum():
    up0, down0 = _weight(30, 10, seed=4), _weight(10, 20, seed=5)
    x = _correlated_inputs(300, 20, seed=6)
    gram = x.T @ x
    (up, down), _ = truncate_factors(up0, down0, 4, gram)
    (dense_up, dense_down), _ = whitened_svd_factors(up0 @ down0, 4, gram)
    assert torch.allclose(up @ down, dense_up @ dense_down, atol=1e-8)


def _dense_rank_k(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_cholesky_ridge_on_singular_gram():
    x = _correlated_inputs(100, 16)
    x[:, 3] = 0.0  # a dead input feature makes the Gram singular
    lower, ridge = cholesky_factor(x.T @ x)
    assert ridge > 0
    assert torch.isfinite(lower).all()
    lower, ridge = cholesky_factor(torch.eye(4, dtype=torch.float64))
    assert ridge == 0.0


@pytest.mark.parametrize("rank", [0, -1, 13, 2.5])
def test_rank_out_of_range_names_layer_and_fix(rank):
    with pytest.raises(InputError, match=r"layer 'blk\.q'.*1\.\.12"):
        svd_factors(_weight(12, 20), rank, name="blk.q")


def test_nonfinite_weight_and_bad_gram_are_refused():
    weight = _weight(8, 6)
    weight[1, 2] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        svd_factors(weight, 2, name="mlp.up")
    with pytest.raises(InputError, match=r"shape \(5, 5\).*\(6, 6\)"):
        whitened_svd_factors(_weight(8, 6), 2, torch.eye(5), name="mlp.up")
    gram = torch.eye(6)
    gram[0, 0] = float("inf")
    with pytest.raises(InputError, match="Gram matrix.*non-finite"):
        whitened_svd_factors(_weight(8, 6), 2, gram)


def test_truncate_cannot_raise_rank():
    with pytest.raises(InputError, match="cannot truncate rank 3 up to 4"):
        truncate_factors(_weight(10, 3), _weight(3, 10), 4)
