"""The row reduction ``C = Lᵀ·Q, s = Σ_rows L`` (weight and bias gradients)."""

from __future__ import annotations

import pytest
import torch

from plrd_kernels.reference import relative_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _reduce(*args, **kwargs):
    from plrd_kernels.grads import reduce_rows

    return reduce_rows(*args, **kwargs)


def _reference(lhs, rhs):
    l2 = lhs.double().reshape(-1, lhs.shape[-1])
    q2 = rhs.double().reshape(-1, rhs.shape[-1])
    return l2.t() @ q2, l2.sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("m, p, q", [(1, 5, 1), (37, 17, 70), (300, 40, 20)])
def test_matches_float64(device, dtype, splits, m, p, q):
    lhs = torch.randn(m, p, device=device, dtype=dtype)
    rhs = torch.randn(m, q, device=device, dtype=dtype)
    c, s = _reduce(lhs, rhs, with_sum=True, splits=splits)
    c_ref, s_ref = _reference(lhs, rhs)
    assert c.shape == (p, q) and c.dtype == dtype
    assert relative_error(c, c_ref) < TOL[dtype]
    assert relative_error(s, s_ref) < TOL[dtype]


def test_automatic_split_over_long_rows(device):
    """Many rows and a single output tile: the split count is > 1 and partials are summed."""
    from plrd_kernels.grads import split_count
    from plrd_kernels.tuning import num_sms

    lhs = torch.randn(3000, 9, device=device)
    rhs = torch.randn(3000, 4, device=device)
    assert split_count(3000, 9, 4, num_sms(lhs.device)) > 1
    c, s = _reduce(lhs, rhs, with_sum=True)
    c_ref, s_ref = _reference(lhs, rhs)
    assert relative_error(c, c_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


def test_more_splits_than_row_blocks(device):
    """Splits with no rows still write zero partials."""
    lhs, rhs = torch.randn(20, 6, device=device), torch.randn(20, 3, device=device)
    c, s = _reduce(lhs, rhs, with_sum=True, splits=5)
    c_ref, s_ref = _reference(lhs, rhs)
    assert relative_error(c, c_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


def test_strided_and_stride_zero_rows(device):
    grad_y = torch.randn(1, 1, 23, device=device).expand(4, 6, 23)  # d(y.sum()) style, stride 0
    hidden = torch.randn(6, 4, 5, device=device).transpose(0, 1)  # 3-D, non-mergeable
    c, s = _reduce(grad_y, hidden, with_sum=True)
    c_ref, s_ref = _reference(grad_y, hidden)
    assert relative_error(c, c_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


def test_column_sums_alone(device):
    lhs = torch.randn(50, 13, device=device)
    c, s = _reduce(lhs, lhs[..., :0], with_sum=True)
    assert c.shape == (13, 0)
    assert relative_error(s, lhs.double().sum(0)) < 1e-5


def test_no_rows_gives_zeros(device):
    lhs, rhs = torch.randn(0, 4, device=device), torch.randn(0, 3, device=device)
    c, s = _reduce(lhs, rhs, with_sum=True)
    assert torch.equal(c, torch.zeros(4, 3, device=device))
    assert torch.equal(s, torch.zeros(4, device=device))
