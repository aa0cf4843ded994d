"""collect_grams: Σ xᵀx per layer (float32 products summed in float64), shared inputs computed
once, hooks always removed."""

import functools

import pytest
import torch
from torch import nn

import plrd
from plrd.errors import InputError
from tests.tiny_models import tiny_bert, tiny_gpt2, token_batches

# Each batch's product is taken in float32 (``plrd.core.calibrate.gram_product``): equal to the
# float64 reference to float32 rounding, not bit for bit.
assert_gram = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)


def _exact(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.T @ flat


class Attention(nn.Module):
    """q, k, v read one tensor; o reads another; an MLP reads a third."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        self.o = nn.Linear(4, 6)
        self.mlp = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x)
        y = self.o(self.q(h) * self.k(h) + self.v(h))
        return self.mlp(x + y)


def _capture(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference: record every layer input with plain hooks and sum xᵀx."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod, args, name=name):
                sums[name] = sums.get(name, 0) + _exact(args[0])

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return sums


def test_grams_are_exact_and_shared_inputs_share_one_tensor():
    torch.manual_seed(0)
    model = Attention()
    batches = [torch.randn(3, 5, 6), torch.randn(2, 7, 6)]
    grams = plrd.collect_grams(model, batches, progress=False)
    reference = _capture(model, batches)
    assert set(grams) == {"q", "k", "v", "o", "mlp"}
    for name, gram in grams.items():
        assert gram.dtype == torch.float64 and gram.shape == reference[name].shape
        assert_gram(gram, reference[name])
    assert grams["q"] is grams["k"] is grams["v"]
    assert grams["o"] is not grams["q"] and grams["mlp"] is not grams["q"]
    assert grams.tokens["q"] == 3 * 5 + 2 * 7


class Diverging(nn.Module):
    """a and b read the same tensor in the first forward, different ones afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.a(x)
        z = self.b(x if self.calls == 1 else 2 * x)
        return y + z


def test_sharing_that_stops_is_split_exactly():
    torch.manual_seed(0)
    batches = [torch.randn(4, 5) for _ in range(3)]
    grams = plrd.collect_grams(Diverging(), batches, progress=False)
    reference = _capture(Diverging(), batches)
    assert grams["a"] is not grams["b"]
    assert_gram(grams["a"], reference["a"])
    assert_gram(grams["b"], reference["b"])


class InPlace(nn.Module):
    """a reads x; the forward then doubles x in place; b reads the changed x (the same object).

    From forward ``share_until`` + 1 on, the doubling happens before a, so a and b read the
    same data: a Gram shared for a while, then split exactly.
    """

    def __init__(self, share_until: int = 0) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)
        self.share_until = share_until
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = x.clone()
        if self.calls <= self.share_until:
            x.mul_(2)
        y = self.a(x)
        if self.calls > self.share_until:
            x.mul_(2)
        return y + self.b(x)


def test_input_changed_in_place_between_two_layers_is_not_shared():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    grams = plrd.collect_grams(InPlace(), [x], progress=False)
    assert grams["a"] is not grams["b"]
    assert_gram(grams["a"], _exact(x))
    assert_gram(grams["b"], _exact(2 * x))  # the data b really read


def test_sharing_ended_by_an_in_place_change_is_split_exactly():
    torch.manual_seed(0)
    batches = [torch.randn(4, 5) for _ in range(3)]
    grams = plrd.collect_grams(InPlace(share_until=1), batches, progress=False)
    reference = _capture(InPlace(share_until=1), batches)
    assert grams["a"] is not grams["b"]
    assert_gram(grams["a"], reference["a"])
    assert_gram(grams["b"], reference["b"])


def test_inference_mode_gives_exact_grams():
    """Inference tensors keep no write counter: nothing is shared, but every Gram is exact."""
    torch.manual_seed(0)
    model = Attention()
    batches = [torch.randn(3, 5, 6), torch.randn(2, 7, 6)]
    with torch.inference_mode():
        grams = plrd.collect_grams(model, batches, progress=False)
    reference = _capture(model, batches)
    assert set(grams) == set(reference)
    for name, gram in grams.items():
        assert_gram(gram, reference[name])


def test_llama_projections_share_grams(llama, batches):
    grams = plrd.collect_grams(llama, batches, progress=False)
    layer = "model.layers.0"
    q, k, v = (grams[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert grams[f"{layer}.mlp.gate_proj"] is grams[f"{layer}.mlp.up_proj"]
    assert grams[f"{layer}.mlp.down_proj"].shape == (128, 128)
    assert grams[f"{layer}.self_attn.o_proj"] is not q
    assert "lm_head" not in grams
    assert set(grams.tokens.values()) == {2 * 2 * 16}
    # the shared Gram equals Σ xᵀx of q_proj's inputs
    seen = []
    handle = llama.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0])
    )
    with torch.no_grad():
        for b in batches:
            llama(b)
    handle.remove()
    assert_gram(q, sum(_exact(x) for x in seen))


def test_dict_batches_and_targets():
    model = tiny_bert()
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in token_batches()]
    grams = plrd.collect_grams(model, batches, targets="*attention.self.*", progress=False)
    assert len(grams) == 6 and all(".attention.self." in n for n in grams)


def test_calibration_runs_in_eval_mode_and_restores_modes():
    model = tiny_bert().train()
    model.bert.embeddings.eval()
    batches = token_batches()
    grams = plrd.collect_grams(model, batches, progress=False)
    reference = plrd.collect_grams(tiny_bert().eval(), batches, progress=False)
    for name, gram in grams.items():
        assert_gram(gram, reference[name])  # dropout was off
    assert model.training and model.bert.encoder.training
    assert not model.bert.embeddings.training and not model.bert.embeddings.dropout.training


def test_gpt2_conv1d_inputs():
    model = tiny_gpt2()
    grams = plrd.collect_grams(model, token_batches(), progress=False)
    assert grams["transformer.h.0.attn.c_attn"].shape == (64, 64)
    assert grams["transformer.h.0.mlp.c_proj"].shape == (256, 256)


def test_hooks_removed_on_error():
    model = Attention()

    def batches():
        yield torch.randn(2, 6)
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        plrd.collect_grams(model, batches(), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(InputError, match="no batches"):
        plrd.collect_grams(model, [], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unknown_target_pattern_names_it():
    with pytest.raises(InputError, match=r"'nope_proj'.*available layers: q, k"):
        plrd.collect_grams(Attention(), [torch.randn(2, 6)], targets="nope_proj", progress=False)
