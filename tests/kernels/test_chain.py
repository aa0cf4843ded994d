"""The fused chain kernel ``T = x·a, Y = T·b + bias`` against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from plrd_kernels.reference import relative_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _chain(*args, **kwargs):
    from plrd_kernels.chain import chain

    return chain(*args, **kwargs)


def _reference(x, a, b, bias):
    t = x.double().reshape(-1, a.shape[0]) @ a.double()
    y = t @ b.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], b.shape[1]), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, k, r, n",
    [
        (1, 20, 1, 40),  # one row: one row block, N split over programs
        (5, 37, 17, 70),  # nothing a multiple of 16
        (70, 64, 64, 48),  # several row blocks, rank exactly a power of two
        (33, 50, 100, 33),  # rank padded to 128 (middle config tier)
        (17, 24, 300, 19),  # rank padded to 512 (fp16: top tier; fp32: two chunks)
    ],
)
def test_forward_matches_float64(device, dtype, m, k, r, n):
    x = torch.randn(m, k, device=device, dtype=dtype)
    down = torch.randn(r, k, device=device, dtype=dtype) / k**0.5
    up = torch.randn(n, r, device=device, dtype=dtype) / r**0.5
    bias = torch.randn(n, device=device, dtype=dtype)
    y, t = _chain(x, down.t(), up.t(), bias, store_t=True)
    y_ref, t_ref = _reference(x, down.t(), up.t(), bias)
    assert y.shape == (m, n) and t.shape == (m, r)
    assert relative_error(y, y_ref) < TOL[dtype]
    assert relative_error(t, t_ref) < TOL[dtype]


@pytest.mark.parametrize(
    "dtype, rank, chunks",
    [(torch.float32, 300, 2), (torch.float16, 600, 2), (torch.float16, 1100, 3)],
)
def test_rank_chunks(device, dtype, rank, chunks):
    """Ranks past one launch's capacity: column chunks, Y accumulated in fp32, T in pieces."""
    from plrd_kernels.chain import rank_chunks
    from plrd_kernels.reference import chain_reference

    assert len(rank_chunks(rank, dtype.itemsize)) == chunks
    x = torch.randn(2, 10, 40, device=device, dtype=dtype)
    down = torch.randn(rank, 40, device=device, dtype=dtype) / 40**0.5
    up = torch.randn(24, rank, device=device, dtype=dtype) / rank**0.5
    bias = torch.randn(24, device=device, dtype=dtype)
    y, t = _chain(x, down.t(), up.t(), bias, store_t=True)
    y_ref, t_ref = _reference(x, down.t(), up.t(), bias)
    assert relative_error(y, y_ref) < TOL[dtype]
    assert relative_error(t, t_ref) < TOL[dtype]
    y_twin, _ = chain_reference(x, down.t(), up.t(), bias)  # same rounding of T: closer still
    assert relative_error(y, y_twin) <= relative_error(y, y_ref) + 1e-6


def test_without_bias_and_without_t(device):
    x = torch.randn(9, 30, device=device)
    a, b = torch.randn(30, 5, device=device), torch.randn(5, 21, device=device)
    y, t = _chain(x, a, b)
    assert t.numel() == 0
    assert relative_error(y, _reference(x, a, b, None)[0]) < 1e-5


def test_t_only(device):
    x = torch.randn(9, 30, device=device)
    a, b = torch.randn(30, 5, device=device), torch.randn(5, 21, device=device)
    y, t = _chain(x, a, b, store_y=False, store_t=True)
    assert y.numel() == 0
    assert relative_error(t, _reference(x, a, b, None)[1]) < 1e-5


def test_split_n_recomputes_the_same_t(device):
    """One row block, several N tiles: the N splits must agree on every column."""
    x = torch.randn(3, 40, device=device)
    a, b = torch.randn(40, 8, device=device), torch.randn(8, 200, device=device)
    y, _ = _chain(x, a, b)
    assert relative_error(y, _reference(x, a, b, None)[0]) < 1e-5


@pytest.mark.parametrize(
    "make_x",
    [
        lambda d: torch.randn(6, 4, 33, device=d).transpose(0, 1),  # 3-D, batch/seq swapped
        lambda d: torch.randn(5, 66, device=d)[:, ::2],  # feature stride 2
        lambda d: torch.randn(33, 7, device=d).t(),  # transposed 2-D
        lambda d: torch.randn(1, 33, device=d).expand(9, 33),  # stride-0 rows
        lambda d: torch.randn(2, 3, 4, 33, device=d).permute(2, 1, 0, 3),  # 3 levels: copied
        lambda d: torch.randn(3, 1, 5, 33, device=d),  # size-1 dim merged away
    ],
)
def test_any_input_layout(device, make_x):
    x = make_x(device)
    k = x.shape[-1]
    a, b = torch.randn(k, 6, device=device), torch.randn(6, 19, device=device)
    bias = torch.randn(40, device=device)[::2][:19]  # strided bias
    y, _ = _chain(x, a, b, bias)
    assert y.shape == (*x.shape[:-1], 19)
    assert relative_error(y, _reference(x, a, b, bias)[0]) < 1e-5


def test_empty_rows(device):
    x = torch.randn(0, 12, device=device)
    y, t = _chain(x, torch.randn(12, 3, device=device), torch.randn(3, 5, device=device))
    assert y.shape == (0, 5)


def test_no_n_split_once_row_blocks_fill_the_sms():
    """N is split only while the row blocks leave at least half the SMs idle (132: H200)."""
    from plrd_kernels.chain import n_splits

    assert n_splits(m_blocks=128, n_tiles=32, sms=132) == 1  # M 8192, BLOCK_M 64
    assert n_splits(m_blocks=64, n_tiles=32, sms=132) == 2  # M 8192, BLOCK_M 128
    assert n_splits(m_blocks=300, n_tiles=32, sms=132) == 1
    assert n_splits(m_blocks=1, n_tiles=64, sms=132) == 64
    assert n_splits(m_blocks=1, n_tiles=400, sms=132) == 132


def test_grid_and_split_counts_stay_symbolic():
    """With a symbolic M (torch.compile, dynamic shapes) the split-N count and the split-M
    count of the reductions are expressions, and computing them adds no guard: on a GPU
    both are evaluated while tracing (the CPU interpreter skips launches on fake tensors)."""
    import triton
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from plrd_kernels.chain import n_splits
    from plrd_kernels.grads import split_count

    env = ShapeEnv()
    symbol = env.create_symbol(8192, ConstantSource("m"), dynamic_dim=DimDynamic.DYNAMIC)
    m = env.create_symintnode(symbol, hint=8192)
    split_n = n_splits(triton.cdiv(m, 64), triton.cdiv(4096, 128), 132)
    split_m = split_count(m, 4096, 64, 132)
    assert isinstance(split_n, torch.SymInt) and isinstance(split_m, torch.SymInt)
    assert not env.guards
    assert (int(split_n), int(split_m)) == (1, 5)  # at the hint, M = 8192
