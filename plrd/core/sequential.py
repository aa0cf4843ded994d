"""Sequential calibration: each block is cut on the inputs the already-cut blocks produce.

``plrd.decompose`` whitens every layer with the Gram of the inputs it sees in the *uncut* model.
Once the blocks before it are cut, a layer sees other inputs, and the early blocks' errors travel
through the rest of the model. Here the repeated blocks of the model (a transformer's decoder
layers: the ``nn.ModuleList`` holding most targeted layers) are cut in order, and within a block
its layers are cut in groups in the order the forward reaches them (layers reading one input
together: q/k/v, then o, then gate/up, then down). Each group's Gram G = Σ x_c x_cᵀ is taken on
the inputs x_c that the cut blocks and groups before it produce:

* ``sequential``: each layer is the best rank-r approximation of W on its new inputs (whitened
  by G instead of the uncut model's Gram);
* ``refit``: each layer keeps the subspace ``down`` that the uncut model's Gram gives it, and its
  ``up`` is solved in closed form (``plrd.core.factorize.refit_up``) so that, from the inputs
  x_c it now sees, it reproduces the uncut layer's outputs W x_p as closely as it can: with
  the cross-Gram C = Σ x_p x_cᵀ, up = W C downᵀ (down G downᵀ)⁻¹ (SVD-LLM's update, fitted to
  the uncut model). The errors of earlier layers are corrected where they can be.

The ranks are those ``plrd.core.surgery.plan_decomposition`` chose on the uncut model's Grams;
only the factors change. Layers outside the blocks are factored from those Grams as usual.

Cost, on the calibration blocks: each block runs once uncut (``refit`` only), once per group
(stopped at the group's input), and once cut: about 3.5 forward passes of the model in all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from plrd.core.calibrate import check_batch, evaluation_pass, gram_product, model_device, to_device
from plrd.core.kinds import layer_shape, set_submodule
from plrd.core.report import DecompositionReport
from plrd.core.surgery import PlannedDecomposition
from plrd.errors import InputError

CALIBRATIONS = ("uncut", "sequential", "refit")
"""uncut: Grams of the model before the cut (``plrd.decompose``); sequential / refit: this
module."""

REFIT_DAMPING = 0.01
"""λ of ``refit_up`` relative to mean(diag(down G downᵀ)): how far the refit may move ``up``."""

_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_cache(value: Any) -> bool:
    """A key/value cache object (Hugging Face ``Cache`` subclasses and the like)."""
    return type(value).__name__.endswith("Cache")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


@dataclass
class _Call:
    """One batch's call of a block: its hidden states and the other arguments, reused for every
    block (the decoder layers of a transformer take the same mask and positions)."""

    hidden: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    by_keyword: bool

    @classmethod
    def of(cls, block: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        # a block run many times must not grow a KV cache
        args = tuple(None if _is_cache(a) else a for a in args)
        kwargs = {
            k: None if k in _CACHE_ARGUMENTS or _is_cache(v) else v for k, v in kwargs.items()
        }
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if args and isinstance(args[0], Tensor):
            return cls(args[0], tuple(args[1:]), kwargs, False)
        hidden = kwargs.pop("hidden_states", None)
        if not isinstance(hidden, Tensor):
            raise InputError(
                f"block {block!r} is called without a hidden-state tensor as its first argument "
                "or as hidden_states=; sequential calibration cannot feed it, use "
                "calibration='uncut'"
            )
        return cls(hidden, tuple(args), kwargs, True)

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """``block`` on ``hidden`` with this call's other arguments; its hidden output."""
        if self.by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out if isinstance(out, Tensor) else out[0]


@dataclass
class _Block:
    name: str
    module: nn.Module
    layers: list[str]


def find_blocks(model: nn.Module, names: Iterable[str]) -> list[_Block]:
    """The children, in order, of the ``nn.ModuleList`` holding most of the layers ``names``.

    Raises InputError when no ``nn.ModuleList`` holds any of them.
    """
    names = list(names)
    best: tuple[str, nn.Module, int] | None = None
    for list_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefix = f"{list_name}." if list_name else ""
            count = sum(n.startswith(prefix) for n in names)
            if count and (best is None or count > best[2]):
                best = (list_name, module, count)
    if best is None:
        raise InputError(
            f"sequential calibration cuts a model block by block, but none of its "
            f"{len(names)} changing layers (e.g. {names[0] if names else '-'!r}) sits in an "
            "nn.ModuleList of blocks; use calibration='uncut'"
        )
    list_name, blocks, _ = best
    found = []
    for index, block in enumerate(blocks):
        name = f"{list_name}.{index}" if list_name else str(index)
        found.append(_Block(name, block, [n for n in names if n.startswith(f"{name}.")]))
    return found


def _first_block_calls(
    model: nn.Module, block: _Block, batches: Iterable[Any], progress: bool
) -> list[_Call]:
    """Each batch's call of the first block (the model's forward stopped there)."""
    calls: list[_Call] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(_Call.of(block.name, args, kwargs))
        raise _Stop

    device = model_device(model)
    handle = block.module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for index, batch in enumerate(
            tqdm(batches, desc="block inputs", unit="batch", disable=not progress)
        ):
            check_batch(index, batch)
            batch = to_device(batch, device)
            try:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
            except _Stop:
                continue
            raise InputError(
                f"the forward pass never reached block {block.name!r}; sequential calibration "
                "needs the blocks to run in the order they are listed"
            )
    finally:
        handle.remove()
    if not calls:
        raise InputError("sequential calibration got no batches; pass calibration blocks")
    return calls


@contextmanager
def _input_hooks(
    layers: Mapping[str, nn.Module], seen: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """Forward pre-hooks calling ``seen(name, x [rows, in])`` with each layer's input."""
    handles = []

    def hook_for(name: str, width: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            seen(name, x.detach().reshape(-1, width))

        return hook

    try:
        for name, module in layers.items():
            hook = hook_for(name, layer_shape(module)[0])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _groups(order: list[tuple[str, tuple]]) -> list[list[str]]:
    """Layers in the order the forward reached them, consecutive ones reading the same input
    (same data and shape) grouped."""
    groups: list[list[str]] = []
    last = None
    for name, storage in order:
        if groups and storage == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = storage
    return groups


def _call_order(layers: Mapping[str, nn.Module], block: nn.Module, call: _Call) -> list[list[str]]:
    """The groups of ``layers`` in one forward of ``block`` (see :func:`_groups`)."""
    order: list[tuple[str, tuple]] = []
    alive: list[Tensor] = []  # a freed input's memory could be reused for the next one

    def seen(name: str, x: Tensor) -> None:
        if name not in {n for n, _ in order}:
            alive.append(x)
            order.append((name, (x.data_ptr(), tuple(x.shape), x.stride())))

    with _input_hooks(layers, seen):
        call.run(block, call.hidden)
    return _groups(order)


def _uncut_inputs(
    layers: Mapping[str, nn.Module], block: nn.Module, calls: list[_Call], hidden: list[Tensor]
) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    """Per batch, every layer's input in the uncut block, and the block's outputs."""
    inputs: list[dict[str, Tensor]] = []
    outputs = []
    with _input_hooks(layers, lambda name, x: inputs[-1].setdefault(name, x.clone())):
        for call, h in zip(calls, hidden, strict=True):
            inputs.append({})
            outputs.append(call.run(block, h))
    return inputs, outputs


def _group_grams(
    first: str,
    module: nn.Module,
    block: nn.Module,
    calls: list[_Call],
    hidden: list[Tensor],
    uncut: list[dict[str, Tensor]] | None,
) -> tuple[Tensor, Tensor | None]:
    """G = Σ x_c x_cᵀ of the group's input on the cut stream and, with ``uncut``, the
    cross-Gram C = Σ x_p x_cᵀ; each forward stops at the group's first layer."""
    width = layer_shape(module)[0]
    gram = torch.zeros(width, width, dtype=torch.float64, device=model_device(module))
    cross = None if uncut is None else torch.zeros_like(gram)
    captured: list[Tensor] = []

    def seen(name: str, x: Tensor) -> None:
        captured.append(x)
        raise _Stop

    with _input_hooks({first: module}, seen):
        for index, (call, h) in enumerate(zip(calls, hidden, strict=True)):
            captured.clear()
            try:
                call.run(block, h)
            except _Stop:
                pass
            if not captured:
                raise InputError(f"layer {first!r} did not run when its block was called")
            x_c = captured[0]
            gram += gram_product(x_c)
            if cross is not None:
                x_p = uncut[index][first]
                cross += (x_p.float().T @ x_c.float()).double()
    return gram, cross


def decompose_sequentially(
    model: nn.Module,
    planned: PlannedDecomposition,
    batches: Iterable[Tensor | Mapping[str, Any]],
    refit: bool = True,
    damping: float = REFIT_DAMPING,
    progress: bool = True,
    reduce: Callable[[dict[str, Tensor]], Any] | None = None,
) -> DecompositionReport:
    """Cut ``model`` in place to the ranks ``planned`` chose, block by block (module docstring).

    ``batches``: the calibration batches (as for ``plrd.collect_grams``), a list or other
    re-iterable. ``refit``: fit each layer to the uncut layer's outputs (else to its own outputs
    on its new inputs). ``reduce``: sums a dict of Grams over data-parallel ranks in place.
    Returns the :class:`DecompositionReport`. Raises InputError when the model has no blocks to
    walk (use ``plrd.decompose``).
    """
    if planned.method != "whiten":
        raise InputError(
            f"sequential calibration whitens every layer on its new inputs, so it needs "
            f"method='whiten', not {planned.method!r}; use calibration='uncut' with 'svd'"
        )
    changes = planned.changes
    blocks = find_blocks(model, changes)
    in_blocks = {n for block in blocks for n in block.layers}
    new_modules = planned.new_layers([n for n in changes if n not in in_blocks])
    with evaluation_pass(model):
        calls = _first_block_calls(model, blocks[0], batches, progress)
        cut = [call.hidden for call in calls]
        uncut = list(cut) if refit else None
        for block in tqdm(blocks, desc="sequential", unit="block", disable=not progress):
            layers = {n: planned.layers[n] for n in block.layers}
            if not layers:
                cut = [c.run(block.module, h) for c, h in zip(calls, cut, strict=True)]
                if uncut is not None:
                    uncut = [c.run(block.module, h) for c, h in zip(calls, uncut, strict=True)]
                continue
            groups = _call_order(layers, block.module, calls[0])
            inputs = None
            if uncut is not None:
                inputs, uncut = _uncut_inputs(layers, block.module, calls, uncut)
            for group in groups:
                first = group[0]
                gram, cross = _group_grams(first, layers[first], block.module, calls, cut, inputs)
                if reduce is not None:
                    reduce({"gram": gram} | ({} if cross is None else {"cross": cross}))
                for name in group:
                    if cross is None:
                        new = planned.rewhitened_layer(name, gram)
                    else:
                        new = planned.refitted_layer(name, gram, cross, damping)
                    new_modules[name] = new
                    set_submodule(model, name, new)
            cut = [c.run(block.module, h) for c, h in zip(calls, cut, strict=True)]
    for name, new in new_modules.items():
        set_submodule(model, name, new)
    return planned.report(model, new_modules)
