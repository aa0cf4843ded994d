"""LowRankLinear: construction, init statistics, conversions to and from nn.Linear."""

import pytest
import torch
from torch import nn

from plrd import LowRankLinear
from plrd.errors import InputError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_parameters_have_contract_shapes():
    layer = LowRankLinear(20, 30, 4)
    assert layer.down.shape == (4, 20) and layer.up.shape == (30, 4)
    assert layer.bias.shape == (30,)
    assert LowRankLinear(20, 30, 4, bias=False).bias is None
    assert "rank=4" in repr(layer)


def test_init_output_variance_matches_linear():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    with torch.no_grad():
        dense = torch.stack([nn.Linear(256, 256, bias=False)(x).var() for _ in range(4)]).mean()
        low = torch.stack(
            [LowRankLinear(256, 256, 64, bias=False)(x).var() for _ in range(4)]
        ).mean()
    assert abs(float(low / dense) - 1.0) < 0.15


def test_full_rank_from_linear_reproduces_linear():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    layer = LowRankLinear.from_linear(linear, 32)
    x = torch.randn(5, 7, 48)
    assert _rel(layer(x), linear(x)) < 1e-5
    assert layer.up.dtype == torch.float32


def test_from_linear_keeps_dtype_and_matches_eckart_young():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear, 6)
    sigma = torch.linalg.svdvals(linear.weight.detach())
    error = torch.linalg.matrix_norm(linear.weight.detach() - layer.dense_weight()) ** 2
    assert torch.allclose(error, (sigma[6:] ** 2).sum())
    assert layer.up.dtype == torch.float64


def test_whitened_from_linear_beats_plain_on_calibration_outputs():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    x = torch.randn(2000, 64) @ torch.diag(torch.logspace(0, -2, 64))
    gram = x.double().T @ x.double()
    plain = LowRankLinear.from_linear(linear, 8)
    white = LowRankLinear.from_linear(linear, 8, gram=gram)
    with torch.no_grad():
        target = linear(x)
        assert (white(x) - target).norm() < (plain(x) - target).norm()


def test_truncate_returns_new_layer_at_optimum():
    torch.manual_seed(0)
    layer = LowRankLinear(30, 20, 10)
    smaller = layer.truncate(4)
    assert smaller is not layer and smaller.rank == 4 and layer.rank == 10
    u, s, vh = torch.linalg.svd(layer.dense_weight().double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert _rel(smaller.dense_weight(), best) < 1e-5
    assert torch.equal(smaller.bias, layer.bias)


def test_to_linear_round_trip():
    torch.manual_seed(0)
    layer = LowRankLinear(16, 12, 3)
    linear = layer.to_linear()
    x = torch.randn(9, 16)
    assert _rel(linear(x), layer(x)) < 1e-6


def test_gradients_flow_to_all_parameters():
    layer = LowRankLinear(8, 6, 2)
    layer(torch.randn(3, 8)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_bad_rank_and_gram_raise_value_error():
    with pytest.raises(InputError, match="rank 0"):
        LowRankLinear(8, 6, 0)
    with pytest.raises(InputError, match="rank 7"):
        LowRankLinear.from_linear(nn.Linear(8, 6), 7, name="h.0.attn")
    with pytest.raises(InputError, match=r"'h\.0\.attn'.*Gram"):
        LowRankLinear.from_linear(nn.Linear(8, 6), 2, gram=torch.eye(6), name="h.0.attn")
    with pytest.raises(InputError, match="Gram"):
        LowRankLinear(8, 6, 4).truncate(2, gram=torch.eye(3))
