"""Loss-aware allocation: output-gradient Grams, the Fisher-weighted spectrum, and a global
choice that cuts where the loss cares least."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plrd
from plrd.core.fisher import fisher_spectrum
from plrd.errors import InputError
from tests.tiny_models import tiny_llama, token_batches


def test_fisher_spectrum_is_sigma_squared_times_the_output_quadratic_form():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    h = a @ a.T
    got = fisher_spectrum(sigma, u * sigma.sqrt(), h)
    want = torch.stack([(sigma[j] ** 2 * u[:, j] @ h @ u[:, j]).sqrt() for j in range(4)])
    assert torch.allclose(got, want)


def test_output_grams_are_symmetric_psd_and_leave_the_model_as_it_was():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grams = plrd.collect_output_grams(model, token_batches(), progress=False)
    q = grams["model.layers.0.self_attn.q_proj"]
    assert q.shape == (64, 64) and q.dtype == torch.float64
    # float32 products: PSD up to float32 rounding
    assert torch.allclose(q, q.T) and torch.linalg.eigvalsh(q).min() > -1e-6 * q.norm()
    assert grams.tokens["model.layers.0.mlp.down_proj"] == sum(b.numel() for b in token_batches())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_output_grams_do_not_depend_on_how_the_blocks_are_batched_or_split():
    """Labels are drawn per block from its token ids, so ranks that each see a shard sum to the
    Grams of one process that saw everything (the family's data-parallel decomposition)."""
    model = tiny_llama()
    blocks = torch.cat(list(token_batches()))
    whole = plrd.collect_output_grams(model, [blocks], progress=False)
    shards = [
        plrd.collect_output_grams(model, blocks[r::2].split(1), progress=False) for r in (0, 1)
    ]
    for name, gram in whole.items():
        summed = shards[0][name] + shards[1][name]
        assert (summed - gram).norm() <= 1e-5 * gram.norm(), name  # float32 products


class _TwoBranches(nn.Module):
    """Two equal layers read the same input; the second one's output is scaled down 100× before
    the logits, so cutting it costs the loss almost nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 24)
        self.loud = nn.Linear(24, 24, bias=False)
        self.quiet = nn.Linear(24, 24, bias=False)
        with torch.no_grad():
            self.quiet.weight.copy_(self.loud.weight)
        self.head = nn.Linear(24, 32, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.loud(x) + 0.01 * self.quiet(x))


def test_fisher_cuts_the_layer_the_loss_cares_less_about():
    batches = [
        torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    chosen = {}
    for allocation in ("global", "fisher"):
        model = _TwoBranches()
        grams = plrd.collect_grams(model, batches, targets=["loud", "quiet"], progress=False)
        out = plrd.collect_output_grams(model, batches, targets=["loud", "quiet"], progress=False)
        plrd.decompose(
            model,
            0.8,
            targets=["loud", "quiet"],
            grams=grams,
            output_grams=out,
            allocation=allocation,
            progress=False,
        )
        chosen[allocation] = {n: getattr(getattr(model, n), "rank", 24) for n in ("loud", "quiet")}
    # the whitened errors of the two equal layers are equal: global splits the cut evenly;
    # fisher takes it from the quiet one
    assert chosen["fisher"]["quiet"] < chosen["fisher"]["loud"]
    assert chosen["fisher"]["loud"] > chosen["global"]["loud"]


def test_fisher_keeps_the_components_the_loss_needs_not_the_largest():
    """W = 10·e0e0ᵀ + 1·e1e1ᵀ and a loss that only reads output 1: the rank-1 cut keeps the
    σ = 1 component, whose loss score (σ²·uᵀHu = 1) beats the σ = 10 one's (100·1e-6)."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0], model[0].weight[1, 1] = 10.0, 1.0
    loss_weights = torch.full((8,), 1e-6, dtype=torch.float64)
    loss_weights[1] = 1.0
    plrd.decompose(
        model,
        0.25,  # 16 of 64 weights: rank 1
        grams={"0": torch.eye(8, dtype=torch.float64)},
        output_grams={"0": torch.diag(loss_weights)},
        allocation="fisher",
        progress=False,
    )
    kept = model[0].up.detach() @ model[0].down.detach()
    expected = torch.zeros(8, 8)
    expected[1, 1] = 1.0
    assert model[0].rank == 1 and torch.allclose(kept, expected, atol=1e-5)


def test_fisher_needs_output_grams():
    model = tiny_llama()
    grams = plrd.collect_grams(model, token_batches(), progress=False)
    with pytest.raises(InputError, match="collect_output_grams"):
        plrd.decompose(model, 0.7, grams=grams, allocation="fisher", progress=False)


def test_both_grams_from_one_pass_equal_the_two_separate_collections():
    model = tiny_llama()
    batches = list(token_batches())
    grams, output_grams = plrd.collect_both_grams(model, batches, progress=False)
    alone = plrd.collect_grams(model, batches, progress=False)
    output_alone = plrd.collect_output_grams(model, batches, progress=False)
    assert set(grams) == set(alone) and set(output_grams) == set(output_alone)
    for name in alone:
        torch.testing.assert_close(grams[name], alone[name])
        torch.testing.assert_close(output_grams[name], output_alone[name])
        assert grams.tokens[name] == alone.tokens[name]
    shared = grams["model.layers.0.self_attn.q_proj"]
    assert shared is grams["model.layers.0.self_attn.k_proj"]  # one Gram per shared input
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
