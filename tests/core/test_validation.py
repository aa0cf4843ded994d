"""Input validation of the public API: bad input raises ValueError before any work, with a
message naming the value (and layer) and the fix. Cases covered elsewhere (bad keep, unknown
method/allocation/pattern, missing Grams, rank out of range in the math) are not repeated here.
"""

import numpy as np
import pytest
import torch
from torch import nn

import plrd
from plrd import LowRankLinear
from plrd.core.factorize import cholesky_factor
from plrd.errors import InputError
from tests.helpers import snapshot, unchanged
from tests.tiny_models import tiny_gpt2, tiny_llama, token_batches

# --- LowRankLinear ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 4, 1), r"in_features=0 must be a positive integer"),
        ((8, -3, 1), r"out_features=-3 must be a positive integer"),
        ((8, 2.5, 1), r"out_features=2\.5 must be a positive integer"),
        ((8, 4, True), r"rank True is out of range; choose an integer rank in 1\.\.4"),
        ((8, 4, 5), r"\[4x8\]: rank 5 is out of range; choose an integer rank in 1\.\.4"),
        ((8, 4, 2.0), r"rank 2\.0 is out of range"),
    ],
)
def test_constructor_rejects_bad_sizes(args, message):
    with pytest.raises(InputError, match=message):
        LowRankLinear(*args)


def test_constructor_accepts_numpy_integers_and_checks_bias_and_dtype():
    layer = LowRankLinear(np.int64(8), np.int32(4), np.int64(2))
    assert type(layer.rank) is int and layer.rank == 2 and layer.down.shape == (2, 8)
    with pytest.raises(InputError, match="bias must be True or False, got 'yes'"):
        LowRankLinear(8, 4, 2, bias="yes")
    with pytest.raises(InputError, match=r"dtype=torch\.int64 is not a floating-point.*float32"):
        LowRankLinear(8, 4, 2, dtype=torch.int64)


def test_from_linear_rejects_other_modules_and_accepts_conv1d():
    with pytest.raises(InputError, match="needs an nn.Linear .*got Conv2d"):
        LowRankLinear.from_linear(nn.Conv2d(3, 3, 1), 1)
    with pytest.raises(InputError, match=r"'blk\.q' is already a LowRankLinear; use layer\.trunc"):
        LowRankLinear.from_linear(LowRankLinear(8, 8, 4), 2, name="blk.q")
    conv = tiny_gpt2().transformer.h[0].mlp.c_fc  # weight stored [in, out] = [64, 256]
    layer = LowRankLinear.from_linear(conv, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_from_linear_rejects_unusable_weights():
    with pytest.raises(InputError, match=r"'h\.0': weight \(4, 6\) is on the meta device.*load"):
        LowRankLinear.from_linear(nn.Linear(6, 4, device="meta"), 2, name="h.0")
    linear = nn.Linear(6, 4)
    linear.weight = nn.Parameter(torch.ones(4, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(InputError, match=r"'h\.0': weight has dtype torch\.int8.*dequantize"):
        LowRankLinear.from_linear(linear, 2, name="h.0")
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight[1, 1] = float("inf")
    with pytest.raises(InputError, match=r"'h\.0': weight \(4, 6\) has 1 non-finite value"):
        LowRankLinear.from_linear(linear, 2, name="h.0")


def _gram(n=6, seed=0):
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _gram().numpy(), r"Gram matrix must be a torch\.Tensor, got ndarray"),
        (lambda: _gram()[:, :5], r"Gram matrix has shape \(6, 5\).*shape \(6, 6\)"),
        (lambda: _gram().index_fill(0, torch.tensor([2]), float("nan")), r"has 6 non-finite"),
        (
            lambda: _gram() - 1e4 * torch.eye(6, dtype=torch.float64),
            r"negative diagonal entry G\[\d,\d\].*not Σ xᵀx",
        ),
        (
            lambda: _gram() + torch.triu(torch.ones(6, 6, dtype=torch.float64), 1),
            r"not symmetric \(max \|G - Gᵀ\| = 1",
        ),
        (lambda: _gram().to(torch.complex128), r"Gram matrix has dtype torch\.complex128"),
    ],
)
def test_bad_gram_is_refused_naming_the_layer(make, message):
    gram = make()
    with pytest.raises(InputError, match=rf"layer 'mlp\.up'.*{message}"):
        LowRankLinear.from_linear(nn.Linear(6, 4), 2, gram=gram, name="mlp.up")
    with pytest.raises(InputError, match=rf"layer 'mlp\.up'.*{message}"):
        LowRankLinear(6, 4, 3).truncate(2, gram=gram, name="mlp.up")


def test_truncate_rank_limits_name_the_layer():
    layer = LowRankLinear(10, 12, 4)
    with pytest.raises(InputError, match=r"'a\.b': cannot truncate rank 4 up to 6.*1\.\.4"):
        layer.truncate(6, name="a.b")
    with pytest.raises(InputError, match=r"'a\.b' \[12x10\]: rank 0 is out of range"):
        layer.truncate(0, name="a.b")


# --- decompose --------------------------------------------------------------------------------


def test_decompose_rejects_non_models_and_non_mapping_grams():
    with pytest.raises(InputError, match="decompose needs a torch.nn.Module.*got dict"):
        plrd.decompose({}, 0.5)
    model = tiny_llama()
    with pytest.raises(InputError, match=r"grams must map layer names.*collect_grams.*got list"):
        plrd.decompose(model, 0.5, grams=[torch.eye(64)])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (5, r"a string or a list of strings, got 5; e\.g\. targets="),
        (["q_proj", 3], r"must be strings, got 3 in \['q_proj', 3\]"),
    ],
)
def test_decompose_rejects_bad_patterns(targets, message):
    with pytest.raises(InputError, match=message):
        plrd.decompose(tiny_llama(), 0.5, targets=targets, method="svd", progress=False)


def test_models_without_targetable_layers():
    plain = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(InputError, match="Sequential has no nn.Linear, Conv1D or LowRankLinear"):
        plrd.decompose(plain, 0.5, method="svd", progress=False)
    with pytest.raises(InputError, match="no nn.Linear"):
        plrd.collect_grams(plain, [torch.zeros(1, 3, dtype=torch.long)], progress=False)
    model = tiny_llama()
    with pytest.raises(InputError, match=r"no layer left .*exclude='\*'.*available layers"):
        plrd.decompose(model, 0.5, exclude="*", method="svd", progress=False)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda g: g.fill_diagonal_(float("nan")), r"Gram matrix \(64, 64\) has 64 non-finite"),
        (lambda g: g.sub_(1e6 * torch.eye(64, dtype=g.dtype)), "negative diagonal entry"),
    ],
)
def test_decompose_names_the_layer_of_a_bad_gram_and_leaves_model_untouched(corrupt, message):
    model = tiny_llama()
    grams = plrd.collect_grams(model, token_batches(), progress=False)
    grams = {name: gram.clone() for name, gram in grams.items()}
    corrupt(grams["model.layers.1.self_attn.o_proj"])
    state = snapshot(model)
    with pytest.raises(
        ValueError, match=rf"layer 'model\.layers\.1\.self_attn\.o_proj'.*{message}"
    ):
        plrd.decompose(model, 0.5, grams=grams, progress=False)
    assert unchanged(model, state)


def test_decompose_names_a_factored_layer_with_non_finite_factors():
    model = tiny_llama()
    plrd.decompose(model, 0.7, method="svd", progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.up[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"'model\.layers\.0\.mlp\.gate_proj': up .*non-finite"):
        plrd.decompose(model, 0.5, method="svd", progress=False)


# --- collect_grams ----------------------------------------------------------------------------


def test_collect_grams_rejects_a_single_tensor_and_empty_batches():
    model = tiny_llama()
    tokens = token_batches(count=1)[0]
    with pytest.raises(InputError, match=r"got one batch \(\(2, 16\)\); pass \[batch\]"):
        plrd.collect_grams(model, tokens, progress=False)
    with pytest.raises(InputError, match=r"got one batch \(a dict\)"):
        plrd.collect_grams(model, {"input_ids": tokens}, progress=False)
    empty = tokens[:, :0]
    with pytest.raises(InputError, match=r"calibration batch 1 is empty \(shape \(2, 0\)\)"):
        plrd.collect_grams(model, [tokens, empty], progress=False)
    with pytest.raises(InputError, match="needs a torch.nn.Module as model, got str"):
        plrd.collect_grams("llama", [tokens], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_collect_grams_names_the_layer_fed_non_finite_inputs():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(InputError, match=r"layer '0' received non-finite inputs .*check the"):
        plrd.collect_grams(model, [x], progress=False)


# --- save / load / count ----------------------------------------------------------------------


def test_save_load_and_count_reject_bad_arguments(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(InputError, match="plrd.save needs a torch.nn.Module as model, got str"):
        plrd.save("model", tmp_path)
    with pytest.raises(InputError, match=r"plrd\.save needs a directory path .*got int"):
        plrd.save(model, 3)
    with pytest.raises(InputError, match=r"parameter 'weight' is on the meta device"):
        plrd.save(nn.Linear(3, 2, device="meta"), tmp_path / "meta")
    assert not (tmp_path / "meta").exists()
    plrd.save(model, tmp_path)
    with pytest.raises(
        ValueError, match="plrd.load needs a torch.nn.Module as model, got NoneType"
    ):
        plrd.load(tmp_path, None)
    with pytest.raises(InputError, match="verify must be True or False, got 'yes'"):
        plrd.load(tmp_path, model, verify="yes")
    with pytest.raises(
        InputError, match="count_parameters needs a torch.nn.Module as model, got list"
    ):
        plrd.count_parameters([model])


# --- Cholesky ridge: reported, never a crash --------------------------------------------------


class DeadFeatures(nn.Module):
    """fc2 reads ReLU(fc1 x) where 6 of fc1's 16 outputs are always negative: dead features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        with torch.no_grad():
            self.fc1.weight[:6] = 0.0
            self.fc1.bias[:6] = -1.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_singular_gram_from_dead_features_is_ridged_and_reported(allocation):
    model = DeadFeatures()
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    grams = plrd.collect_grams(model, [x], progress=False)
    assert int(torch.linalg.matrix_rank(grams["fc2"])) <= 10  # singular: 6 dead inputs
    with torch.no_grad():
        inputs = torch.relu(model.fc1(x)).double()  # what fc2 sees
        dense_fc2 = model.fc2.weight.detach().double().clone()
    report = plrd.decompose(model, 0.6, grams=grams, allocation=allocation, progress=False)
    assert "fc2" in report.ridges and report.ridges["fc2"] > 0
    assert "fc1" not in report.ridges  # its Gram (of x) is positive definite
    text = str(report)
    assert "note: 1 layer(s) had a singular calibration Gram" in text and "'fc2'" in text
    assert report.to_dict()["layers"][1]["ridge"] == report.ridges["fc2"]
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    # the ridged whitening still beats plain SVD on the calibration inputs
    fc2 = model.fc2
    assert isinstance(fc2, LowRankLinear) and fc2.ridge > 0
    plain = LowRankLinear.from_linear(_linear(dense_fc2), fc2.rank)
    white_err = (inputs @ (dense_fc2 - fc2.dense_weight().double()).T).norm()
    plain_err = (inputs @ (dense_fc2 - plain.dense_weight().double()).T).norm()
    assert white_err <= plain_err * (1 + 1e-6)


def _linear(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_zero_gram_is_ridged_not_a_crash():
    lower, ridge = cholesky_factor(torch.zeros(5, 5, dtype=torch.float64))
    assert ridge > 0 and torch.isfinite(lower).all()
    layer = LowRankLinear.from_linear(nn.Linear(5, 4), 2, gram=torch.zeros(5, 5))
    assert layer.ridge > 0 and torch.isfinite(layer.dense_weight()).all()
