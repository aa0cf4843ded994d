"""Output-gradient Grams H = Σ g gᵀ of the targeted layers: what a change of each layer's output
costs the model's predictions.

For a layer y = W x (+ b) and g = ∂ℓ/∂y, with ℓ = −log p(ŷ) for a label ŷ SAMPLED from the
model's own next-token distribution, E[g gᵀ] is the Fisher information of the layer's output.
Under the K-FAC approximation, replacing W by W' raises KL(model ‖ changed model) by about
½‖Rᵀ(W − W')L‖²_F / N over N tokens (H = R Rᵀ, G = L Lᵀ the input Gram): unlike the whitened
output error ‖(W − W')L‖² alone, this is in one unit for every layer, so it can choose where to
cut across the whole model (``plrd.decompose(..., allocation="fisher")``).

Costs one forward and one backward pass per batch (about three forwards), and one
[out, out] float64 Gram per layer. ``collect_both_grams`` takes the input Grams on the same
forward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from plrd.core.calibrate import (
    GramCollector,
    Grams,
    check_batch,
    check_batches_argument,
    check_result,
    gram_hooks,
    gram_product,
    model_device,
    to_device,
)
from plrd.core.kinds import layer_shape
from plrd.core.targets import Patterns, find_targets
from plrd.errors import InputError


def row_seeds(batch: Tensor | Mapping[str, Any], seed: int, index: int) -> list[int]:
    """One label-sampling seed per row of ``batch``, from ``seed`` and the row's token ids, so a
    block draws the same labels however the blocks are batched or sharded over ranks (rows
    without token ids fall back to the batch ``index``)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, Tensor) or ids.dim() < 1:
        return [hash((seed, index)) & (2**63 - 1)]
    rows = ids.reshape(ids.shape[0], -1).long().cpu().numpy()
    return [
        int.from_bytes(
            hashlib.blake2b(row.tobytes(), digest_size=8, key=str(seed).encode()).digest()
        )
        for row in rows
    ]


def sampled_nll(logits: Tensor, seeds: list[int]) -> Tensor:
    """Σ over positions of −log p(ŷ) with ŷ drawn from softmax(logits) [B, ..., V] (no gradient
    through the draw); row b's labels come from a generator seeded with ``seeds[b]`` (one seed
    for all rows when only one is given)."""
    rows = logits.reshape(len(seeds), -1, logits.shape[-1]).float()
    with torch.no_grad():
        labels = torch.stack(
            [
                torch.multinomial(
                    torch.softmax(row, dim=-1).cpu(), 1, generator=torch.Generator().manual_seed(s)
                ).view(-1)
                for row, s in zip(rows, seeds, strict=True)
            ]
        )
    return F.cross_entropy(
        rows.reshape(-1, rows.shape[-1]), labels.view(-1).to(rows.device), reduction="sum"
    )


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise InputError(
            f"the model returned {type(output).__name__}, not logits; collect_output_grams "
            "needs a model whose output is the logits or has a .logits attribute"
        )
    return logits


def _output_gram_hooks(
    layers: Mapping[str, nn.Module], grams: Grams
) -> list[torch.utils.hooks.RemovableHandle]:
    """Full backward hooks adding g gᵀ of each layer's output gradient g [..., out] to
    ``grams`` (float32 products summed in float64) and counting rows in ``grams.tokens``."""

    def hook(name: str, width: int):
        def record(module: nn.Module, grad_input: Any, grad_output: tuple[Tensor, ...]) -> None:
            g = gram_product(grad_output[0].detach().reshape(-1, width))
            grams[name] = grams[name] + g if name in grams else g
            grams.tokens[name] = grams.tokens.get(name, 0) + grad_output[0].numel() // width

        return record

    return [m.register_full_backward_hook(hook(n, layer_shape(m)[1])) for n, m in layers.items()]


def _sensitivity_pass(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Tensor | Mapping[str, Any]],
    seed: int,
    progress: bool,
    inputs: GramCollector | None = None,
) -> tuple[Grams, int]:
    """One forward and backward pass per batch with the output-gradient hooks on (and the input
    Gram hooks of ``inputs`` fed on the same forward); returns the output Grams and the number
    of batches. Eval mode; parameters' ``requires_grad`` and ``.grad`` and each module's mode
    are restored."""
    grams = Grams()
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    modes = {m: m.training for m in model.modules()}
    handles = _output_gram_hooks(layers, grams)
    device = model_device(model)
    count = 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(p.is_floating_point())
            p.grad = None
        for batch in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress):
            check_batch(count, batch)
            if inputs is not None:
                inputs.start_forward()
            batch = to_device(batch, device)
            output = model(**batch) if isinstance(batch, Mapping) else model(batch)
            sampled_nll(_logits(output), row_seeds(batch, seed, count)).backward()
            for p in params:
                p.grad = None
            count += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes.items():
            m.train(mode)
    if count == 0:
        raise InputError("collect_output_grams got no batches; pass a non-empty iterable")
    return grams, count


def collect_output_grams(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    targets: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    progress: bool = True,
) -> Grams:
    """``{layer name: Σ g gᵀ}`` (float64 [out, out]) of the targeted layers over ``batches``,
    with g the gradient of the sampled-label loss at the layer's output (see the module
    docstring). ``batches`` as for ``plrd.collect_grams``; ``seed`` fixes the sampled labels.
    Eval mode; parameters' ``requires_grad`` and ``.grad`` and each module's mode are restored.
    """
    check_batches_argument(model, batches, "collect_output_grams")
    layers = find_targets(model, targets, exclude)
    return _sensitivity_pass(model, layers, batches, seed, progress)[0]


def collect_both_grams(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    targets: Patterns = None,
    exclude: Patterns = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Grams, Grams]:
    """``(collect_grams(...), collect_output_grams(...))`` from one pass over ``batches``: the
    input Grams Σ xᵀx are taken on the forward that the output gradients need (the same
    numbers as a separate no-grad pass, one forward fewer)."""
    check_batches_argument(model, batches, "collect_both_grams")
    layers = find_targets(model, targets, exclude)
    with gram_hooks(layers) as collector:
        output_grams, count = _sensitivity_pass(model, layers, batches, seed, progress, collector)
    grams = collector.result()
    check_result(grams, layers, count)
    return grams, output_grams


def fisher_spectrum(sigma: Tensor, up: Tensor, output_gram: Tensor) -> Tensor:
    """The singular values of a (whitened) layer restated in loss units, for a global choice.

    With W·L = U Σ Vᵀ and the balanced factor ``up`` = U √Σ [out, k] (k ≤ len(σ)), dropping
    component j changes the output by σ_j u_j (v_jᵀ L⁻¹ x), which raises the loss by about
    σ_j² · u_jᵀ H u_j (``output_gram`` H [out, out]). Returns √(σ_j² · u_jᵀ H u_j) for
    j < k, float64 [k]: a spectrum ``plrd.core.ranks.global_ranks`` can compare across layers.
    """
    up64 = up.double()
    gram = output_gram.to(up64.device, torch.float64)
    quadratic = ((gram @ up64) * up64).sum(dim=0).clamp_min(0.0)  # σ_j · u_jᵀ H u_j
    return (sigma[: up64.shape[1]].double().clamp_min(0.0) * quadratic).sqrt()


def by_loss(scores: Tensor, up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The components reordered by ``scores`` [k] (loss units, largest first): ``(scores, up
    [out, k], down [k, in])`` permuted alike, so that a rank-r cut keeps the r components that
    cost the loss most to drop, which need not be those of largest σ."""
    order = torch.argsort(scores, descending=True, stable=True)
    return scores[order], up[:, order.to(up.device)], down[order.to(down.device)]
