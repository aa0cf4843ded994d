"""Hypothesis fuzz of LowRankLinear, truncation and decompose over shapes, ranks, dtypes, keeps,
allocations and layer patterns. Example counts are bounded; ``PLRD_FUZZ_SCALE=10`` runs ten
times as many.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import plrd
from plrd import LowRankLinear
from plrd.core.budget import smallest_fraction
from plrd.core.factorize import break_even_rank
from plrd.core.kinds import layer_shape
from plrd.core.ranks import LayerSpec
from plrd.core.targets import find_targets
from plrd.errors import InputError
from tests.helpers import snapshot, unchanged
from tests.tiny_models import tiny_llama, token_batches

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = int(os.environ.get("PLRD_FUZZ_SCALE", "1"))
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10}
"""Relative tolerance of an error equality, measured against ‖W‖² (or the whitened ‖W L‖²)."""


def fuzz(examples: int):
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


dtypes = st.sampled_from([torch.float32, torch.float64])
widths = st.integers(1, 24)


def _random(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def layer_cases(draw):
    n_in, n_out = draw(widths), draw(widths)
    rank = draw(st.integers(1, min(n_in, n_out)))
    return n_in, n_out, rank, draw(dtypes), draw(st.booleans()), draw(st.integers(0, 2**16))


@fuzz(60)
@given(case=layer_cases(), lead=st.lists(st.integers(0, 3), max_size=2))
def test_layer_forward_matches_dense_product(case, lead):
    n_in, n_out, rank, dtype, bias, seed = case
    torch.manual_seed(seed)
    layer = LowRankLinear(n_in, n_out, rank, bias=bias, dtype=dtype)
    assert layer.up.dtype == dtype and plrd.count_parameters(layer) == rank * (n_in + n_out) + (
        n_out if bias else 0
    )
    x = _random((*lead, n_in), dtype, seed + 1)
    with torch.no_grad():
        y = layer(x)
        weight = layer.up.double() @ layer.down.double()
        expected = x.double() @ weight.T + (layer.bias.double() if bias else 0.0)
        assert y.shape == (*lead, n_out) and y.dtype == dtype
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        linear = layer.to_linear()
        torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-5)
        back = LowRankLinear.from_linear(linear, min(n_in, n_out))  # full rank: exact
        torch.testing.assert_close(back(x).double(), expected, rtol=1e-4, atol=1e-4)


def _tail(sigma: torch.Tensor, rank: int) -> float:
    return float((sigma[rank:] ** 2).sum())


@fuzz(60)
@given(case=layer_cases(), whiten=st.booleans(), tokens=st.integers(1, 60))
def test_from_linear_reaches_the_optimum(case, whiten, tokens):
    """Error = Σ_{i>r} σ_i² of W (or of W·L, G + ridge = L Lᵀ; eigenvalues of W G Wᵀ).

    Singular Grams (fewer tokens than inputs) are fuzzed in float64 only: casting the optimum to
    float32 loses accuracy in proportion to the condition number of L."""
    n_in, n_out, rank, dtype, bias, seed = case
    if dtype == torch.float32:
        tokens = 2 * n_in + tokens
    linear = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(_random((n_out, n_in), dtype, seed))
    weight = linear.weight.detach().double()
    gram = None
    if whiten:
        x = _random((tokens, n_in), torch.float64, seed + 1)
        gram = x.T @ x
    layer = LowRankLinear.from_linear(linear, rank, gram=gram)
    assert layer.rank == rank and layer.up.dtype == dtype
    delta = weight - layer.up.detach().double() @ layer.down.detach().double()
    if gram is None:
        error, scale = float((delta**2).sum()), float((weight**2).sum())
        sigma = torch.linalg.svdvals(weight)
    else:
        ridged = gram + layer.ridge * gram.diagonal().mean() * torch.eye(n_in, dtype=gram.dtype)
        error = float(torch.trace(delta @ ridged @ delta.T))
        squares = torch.linalg.eigvalsh(weight @ ridged @ weight.T).flip(0).clamp_min(0)
        sigma = squares[: min(n_in, n_out)].sqrt()
        scale = float(squares.sum())
    assert abs(error - _tail(sigma, rank)) <= TOLERANCE[dtype] * max(scale, 1e-30)


@st.composite
def truncate_cases(draw):
    n_in, n_out = draw(widths), draw(widths)
    current = draw(st.integers(1, min(n_in, n_out)))
    rank = draw(st.integers(1, current))
    return n_in, n_out, current, rank, draw(dtypes), draw(st.integers(0, 2**16))


@fuzz(60)
@given(case=truncate_cases(), whiten=st.booleans(), degenerate=st.booleans())
def test_truncate_is_as_good_as_a_dense_svd_of_the_product(case, whiten, degenerate):
    n_in, n_out, current, rank, dtype, seed = case
    layer = LowRankLinear(n_in, n_out, current, dtype=dtype)
    with torch.no_grad():
        layer.up.copy_(_random((n_out, current), dtype, seed))
        layer.down.copy_(_random((current, n_in), dtype, seed + 1))
        if degenerate and current > 1:  # a repeated column: up·down has lower rank than r
            layer.up[:, -1] = layer.up[:, 0]
            layer.down[-1] = layer.down[0]
    product = layer.up.detach().double() @ layer.down.detach().double()
    gram, lower = None, torch.eye(n_in, dtype=torch.float64)
    if whiten:
        x = _random((2 * n_in + 5, n_in), torch.float64, seed + 2)
        gram = x.T @ x
        lower = torch.linalg.cholesky(gram)
    smaller = layer.truncate(rank, gram=gram)
    assert smaller.rank == rank and smaller.up.dtype == dtype
    assert torch.equal(smaller.bias, layer.bias)
    delta = (product - smaller.dense_weight().double()) @ lower
    sigma = torch.linalg.svdvals(product @ lower)  # the dense reference
    scale = float((sigma**2).sum())
    assert abs(float((delta**2).sum()) - _tail(sigma, rank)) <= TOLERANCE[dtype] * max(scale, 1)


class Stack(nn.Module):
    """Linear layers of the given widths with tanh between; some may start factored."""

    def __init__(self, widths: list[int], factored: list[bool], bias: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers = []
        for n_in, n_out, lowrank in zip(widths, widths[1:], factored, strict=False):
            dense = nn.Linear(n_in, n_out, bias=bias)
            rank = min(n_in, n_out)
            layers.append(LowRankLinear.from_linear(dense, rank) if lowrank else dense)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _max_jump(specs: list[LayerSpec]) -> int:
    """Largest change of the total from one rank step of one layer: in + out, or the jump from
    unchanged to threshold − 1 (dense: < 2·(in + out); factored above break-even: more)."""
    jumps = [s.step for s in specs]
    jumps += [s.weight_params - (s.threshold - 1) * s.step for s in specs if s.threshold > 1]
    return max(jumps)


def _check_report(model, report, before_ranks, targets):
    after = plrd.count_parameters(model)
    assert report.params_after == after
    specs = [LayerSpec(n, *layer_shape(model.get_submodule(n)), before_ranks[n]) for n in targets]
    assert abs(after - report.target_params) <= _max_jump(specs)
    assert sum(c.params_after - c.params_before for c in report.layers) == (
        report.params_after - report.params_before
    )
    for change in report.layers:
        module = model.get_submodule(change.name)
        n_in, n_out = layer_shape(module)
        before = before_ranks[change.name]
        if change.rank_after is None:
            assert not isinstance(module, LowRankLinear)
        else:
            assert isinstance(module, LowRankLinear) and module.rank == change.rank_after
            limit = min(n_in, n_out) if before is None else before
            assert 1 <= module.rank <= limit
            if change.changed and before is None:
                assert module.rank < break_even_rank(n_in, n_out)


def _decompose_or_refuse(model, keep, targets=None, exclude=None, **kwargs):
    """Decompose, checking reach first: a ``keep`` below ``smallest_fraction`` must be refused
    (model untouched) and returns None; a reachable one must succeed and returns the report.
    A ``keep`` within one parameter of the boundary (where rounding decides) is not drawn."""
    total = plrd.count_parameters(model)
    smallest = smallest_fraction(model, targets, exclude)
    assume(abs(keep - smallest) * total > 1)
    event("refused" if keep < smallest else "decomposed")
    if keep < smallest:
        before = snapshot(model)
        with pytest.raises(InputError, match="smallest reachable keep"):
            plrd.decompose(model, keep, targets, exclude, progress=False, **kwargs)
        assert unchanged(model, before)
        return None
    return plrd.decompose(model, keep, targets, exclude, progress=False, **kwargs)


def _ranks(model, names):
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = module.rank if isinstance(module, LowRankLinear) else None
    return out


@fuzz(60)
@given(
    widths=st.lists(st.integers(1, 20), min_size=2, max_size=5),
    factored=st.lists(st.booleans(), min_size=4, max_size=4),
    bias=st.booleans(),
    keep=st.floats(0.01, 1.0),
    allocation=st.sampled_from(["uniform", "global"]),
    method=st.sampled_from(["svd", "whiten"]),
    tokens=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_decompose_stacks(widths, factored, bias, keep, allocation, method, tokens, seed):
    model = Stack(widths, factored, bias, seed)
    x = _random((tokens, widths[0]), torch.float32, seed + 1)
    grams = plrd.collect_grams(model, [x], progress=False) if method == "whiten" else None
    names = list(find_targets(model))
    before_ranks = _ranks(model, names)
    report = _decompose_or_refuse(model, keep, grams=grams, allocation=allocation, method=method)
    if report is not None:
        _check_report(model, report, before_ranks, names)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


TARGETS = [None, "mlp.*", "self_attn.*", "*_proj", ".*v_proj", ["q_proj", "down_proj"]]
EXCLUDES = [None, "layers.1.*", "o_proj", ["k_proj", "up_proj"]]


@pytest.fixture(scope="module")
def llama_and_grams():
    model = tiny_llama()
    return model, plrd.collect_grams(model, token_batches(), progress=False)


@fuzz(40)
@given(
    keep=st.floats(0.3, 1.0),
    allocation=st.sampled_from(["uniform", "global"]),
    targets=st.sampled_from(TARGETS),
    exclude=st.sampled_from(EXCLUDES),
    twice=st.booleans(),
)
def test_decompose_llama_patterns(llama_and_grams, keep, allocation, targets, exclude, twice):
    parent, grams = llama_and_grams
    model = copy.deepcopy(parent)
    try:
        selected = list(find_targets(model, targets, exclude))
    except ValueError:
        assume(False)  # every layer excluded: covered by the validation tests
    report = _decompose_or_refuse(model, keep, targets, exclude, grams=grams, allocation=allocation)
    for name, module in model.named_modules():  # untargeted layers are untouched
        if isinstance(module, nn.Linear) and name not in selected:
            torch.testing.assert_close(module.weight, parent.get_submodule(name).weight)
    if report is not None:
        assert [c.name for c in report.layers] == selected
        _check_report(model, report, dict.fromkeys(selected), selected)
    if twice:
        before_ranks = _ranks(model, selected)
        again = _decompose_or_refuse(
            model, 0.9, targets, exclude, method="svd", allocation=allocation
        )
        if again is not None:
            _check_report(model, again, before_ranks, selected)
    with torch.no_grad():
        assert torch.isfinite(model(token_batches(count=1)[0]).logits).all()
