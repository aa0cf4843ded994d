"""The decode path (split-K shrink, then expand) for M ≤ decode.MAX_ROWS rows."""

from __future__ import annotations

import pytest
import torch

from plrd_kernels.reference import relative_error

TOL = {torch.float32: 1e-5, torch.float16: 1e-3}


def _reference(x, a, b, bias):
    t = x.double().reshape(-1, a.shape[0]) @ a.double()
    y = t @ b.double()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], b.shape[1]), t


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts calls of the decode path, so a test knows which path ``chain`` took."""
    from plrd_kernels import decode

    calls = []
    real = decode.decode_chain

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_chain", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, k, r, n, with_bias",
    [
        (1, 300, 17, 70, True),  # three K splits (≥ 128 columns each)
        (5, 37, 8, 40, False),  # one split, nothing a multiple of 16
        (16, 260, 64, 33, True),  # a full 16-row tile
    ],
)
def test_matches_float64(device, decode_calls, dtype, m, k, r, n, with_bias):
    from plrd_kernels.chain import chain
    from plrd_kernels.decode import k_splits

    x = torch.randn(m, k, device=device, dtype=dtype)
    down = torch.randn(r, k, device=device, dtype=dtype) / k**0.5
    up = torch.randn(n, r, device=device, dtype=dtype) / r**0.5
    bias = torch.randn(n, device=device, dtype=dtype) if with_bias else None
    y, t = chain(x, down.t(), up.t(), bias, store_t=True)
    assert len(decode_calls) == 1
    y_ref, t_ref = _reference(x, down.t(), up.t(), bias)
    assert relative_error(y, y_ref) < TOL[dtype]
    assert relative_error(t, t_ref) < TOL[dtype]
    if k == 300:
        assert k_splits(k, 4) == 3


@pytest.mark.parametrize(
    "make_x",
    [
        lambda d: torch.randn(4, 3, 33, device=d).transpose(0, 1),  # 3-D, batch/seq swapped
        lambda d: torch.randn(7, 66, device=d)[:, ::2],  # feature stride 2
        lambda d: torch.randn(1, 33, device=d).expand(9, 33),  # stride-0 rows
    ],
)
def test_any_input_layout(device, decode_calls, make_x):
    from plrd_kernels.chain import chain

    x = make_x(device)
    a, b = torch.randn(33, 6, device=device), torch.randn(6, 19, device=device)
    y, _ = chain(x, a, b, None)
    assert decode_calls and y.shape == (*x.shape[:-1], 19)
    assert relative_error(y, _reference(x, a, b, None)[0]) < 1e-5


def test_more_rows_take_the_chain_kernel(device, decode_calls):
    from plrd_kernels.chain import chain
    from plrd_kernels.decode import MAX_ROWS

    x = torch.randn(MAX_ROWS + 1, 20, device=device)
    a, b = torch.randn(20, 4, device=device), torch.randn(4, 8, device=device)
    y, _ = chain(x, a, b)
    assert not decode_calls
    assert relative_error(y, _reference(x, a, b, None)[0]) < 1e-5


def test_no_output_columns_still_writes_t(device, decode_calls):
    from plrd_kernels.chain import chain

    x, a = torch.randn(3, 20, device=device), torch.randn(20, 5, device=device)
    y, t = chain(x, a, torch.randn(5, 0, device=device), store_t=True)
    assert decode_calls and y.shape == (3, 0)
    assert relative_error(t, x.double() @ a.double()) < 1e-5


def test_k_splits_cap():
    """At most one shrink program per SM and MAX_K_SPLITS; ≥ MIN_K_PER_SPLIT columns each."""
    from plrd_kernels.decode import MAX_K_SPLITS, k_splits

    assert k_splits(300, 4) == 3
    assert k_splits(4096, 132) == 32
    assert k_splits(11008, 132) == MAX_K_SPLITS  # 86 before the cap
    assert k_splits(11008, 16) == 16
    assert k_splits(37, 132) == 1
