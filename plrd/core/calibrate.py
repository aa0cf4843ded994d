"""Calibration: input Gram matrices G = Σ xᵀx of the targeted layers, for whitened SVD.

For a layer y = x Wᵀ + b seeing inputs x [..., in], G accumulates over every token (leading dims
flattened): G = Σ_t x_t x_tᵀ, float64, [in, in]. Then the output error of a replacement W' on
those inputs is Σ_t ‖(W − W') x_t‖² = ‖(W − W') L‖_F² with G = L Lᵀ (see ``plrd.core.factorize``).
Every layer sees every token once, so Grams of different layers share one scale and their
spectra are comparable (global allocation relies on this).

Layers that read the same input tensor in a forward pass (q/k/v projections, gate/up) get one
Gram, computed once: the returned dict maps each of their names to the same tensor object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from plrd.core.checks import check_module
from plrd.core.kinds import layer_shape
from plrd.core.targets import Patterns, find_targets
from plrd.errors import InputError


def gram_product(rows: Tensor) -> Tensor:
    """rowsᵀ rows [n, d] → [d, d] float64, multiplied in float32 (float64 inputs stay float64).

    One batch's product has a relative error near 1e-6 in float32, far below what whitening
    resolves, and runs faster than in float64 (1.5× for a [1024, 1536] batch on this project's
    CPU); the sum over batches is kept in float64.
    """
    work = rows if rows.dtype == torch.float64 else rows.float()
    return (work.T @ work).double()


class Grams(dict):
    """``{layer name: Σ xᵀx}`` (float64 [in, in]); ``tokens[name]`` = rows accumulated."""

    def __init__(self, *args: Any, tokens: Mapping[str, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens: dict[str, int] = dict(tokens or {})


def _version(t: Tensor) -> int | None:
    """``t``'s in-place write counter (shared by every view of its storage), or None for an
    inference-mode tensor, which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass(frozen=True)
class _Input:
    """A layer input as it was when a hook saw it: the tensor (held alive, so its memory
    cannot be reused) and its write counter at that moment."""

    tensor: Tensor
    version: int | None

    @classmethod
    def of(cls, x: Tensor) -> _Input:
        return cls(x, _version(x))

    def holds(self, x: Tensor) -> bool:
        """True when ``x`` has exactly the data this input had when it was seen.

        Same data means the same elements of the same memory — device, dtype, shape, strides
        and data pointer agree (the identical object trivially does) — and nothing written
        there since: the write counter has not moved. Identity alone is not enough: a forward
        may change a tensor in place (``x.mul_(2)``) between two layers reading it. Without a
        counter (inference tensors) nothing can be proven, so nothing is shared.
        """
        if self.version is None or _version(x) != self.version:
            return False
        y = self.tensor
        return x is y or (
            x.device == y.device
            and x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.data_ptr() == y.data_ptr()
        )


class GramCollector:
    """Forward pre-hook state for Gram accumulation with shared inputs.

    A layer seen for the first time joins the group of a layer called once so far in this
    forward pass with the same input data (:meth:`_Input.holds`; one of the last few inputs,
    held alive so their memory cannot be reused); it then shares that layer's accumulator.
    Each later forward re-checks the sharing; a member whose input differs (or that misses a
    call) gets its own accumulator, split exactly: the group's sum minus the contribution it
    did not share.
    """

    WINDOW = 4

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)
        self.leader: dict[str, str] = {}  # name → name owning its accumulator
        self.acc: dict[str, Tensor] = {}  # leader → Σ xᵀx
        self.tokens: dict[str, int] = {}  # leader → rows accumulated
        self.followers: dict[str, set[str]] = {}  # leader → other names sharing it
        self.forward = 0
        self.first_forward: dict[str, int] = {}
        self._reset_forward()

    def _reset_forward(self) -> None:
        self.recent: list[tuple[str, _Input]] = []  # (leader, its latest input), newest last
        self.calls: dict[str, int] = {}  # leader → calls in this forward
        self.current: dict[str, tuple[_Input, Tensor]] = {}  # leader → (input, xᵀx) latest
        self.pending: dict[str, set[str]] = {}  # leader → followers yet to consume `current`

    def start_forward(self) -> None:
        """Close the previous forward pass (followers that missed a call are split off)."""
        for leader, waiting in list(self.pending.items()):
            for name in list(waiting):
                self._split(name, leader)
        self.forward += 1
        self._reset_forward()

    @staticmethod
    def _rows(x: Tensor) -> int:
        return x.numel() // x.shape[-1]

    def _add(self, leader: str, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        g = gram_product(flat)
        if leader in self.acc:
            self.acc[leader] += g
        else:
            self.acc[leader] = g.clone()
        self.tokens[leader] = self.tokens.get(leader, 0) + self._rows(x)
        return g

    def _remember(self, leader: str, seen: _Input) -> None:
        self.recent = [(n, y) for n, y in self.recent if n != leader]
        self.recent.append((leader, seen))
        del self.recent[: -self.WINDOW]

    def hook(self, name: str, x: Tensor) -> None:
        """Account layer ``name``'s input x [..., in] (called by its forward pre-hook)."""
        leader = self.leader.get(name)
        if leader is None:
            self._first_call(name, x)
        elif leader == name:
            self._leader_call(name, x)
        else:
            self._follower_call(name, leader, x)

    def _first_call(self, name: str, x: Tensor) -> None:
        self.first_forward[name] = self.forward
        for leader, y in reversed(self.recent):
            if (
                self.first_forward[leader] == self.forward
                and self.calls.get(leader) == 1
                and y.holds(x)
            ):
                self.leader[name] = leader
                self.followers[leader].add(name)
                return
        self.leader[name] = name
        self.followers[name] = set()
        self._leader_call(name, x)

    def _leader_call(self, name: str, x: Tensor) -> None:
        for follower in list(self.pending.get(name, ())):
            self._split(follower, name)  # it missed this leader's previous input
        g = self._add(name, x)
        seen = _Input.of(x)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.followers[name]:
            self.current[name] = (seen, g)
            self.pending[name] = set(self.followers[name])
        self._remember(name, seen)

    def _follower_call(self, name: str, leader: str, x: Tensor) -> None:
        held = self.current.get(leader)
        waiting = self.pending.get(leader, set())
        if held is not None and name in waiting and held[0].holds(x):
            waiting.discard(name)
            if not waiting:
                del self.current[leader], self.pending[leader]
            return
        self._split(name, leader)
        self._leader_call(name, x)

    def _split(self, name: str, leader: str) -> None:
        """Give follower ``name`` its own accumulator holding exactly what it consumed."""
        acc = self.acc[leader].clone()
        rows = self.tokens[leader]
        waiting = self.pending.get(leader)
        if waiting is not None and name in waiting:
            seen, g = self.current[leader]
            acc -= g
            rows -= self._rows(seen.tensor)
            waiting.discard(name)
            if not waiting:
                del self.current[leader], self.pending[leader]
        self.followers[leader].discard(name)
        self.leader[name] = name
        self.followers[name] = set()
        self.acc[name] = acc
        self.tokens[name] = rows

    def result(self) -> Grams:
        """Every layer that ran → its Σ xᵀx (one tensor per group sharing an input)."""
        out = Grams()
        for name in self.names:
            if name in self.leader:
                leader = self.leader[name]
                out[name] = self.acc[leader]
                out.tokens[name] = self.tokens[leader]
        return out


def model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def check_batches_argument(model: Any, batches: Any, call: str = "collect_grams") -> None:
    """``model`` is a module and ``batches`` an iterable of batches (not one batch)."""
    check_module(model, call)
    if isinstance(batches, (Tensor, Mapping)):
        shape = tuple(batches.shape) if isinstance(batches, Tensor) else "a dict"
        raise InputError(
            f"batches must be an iterable of batches, got one batch ({shape}); pass [batch], "
            "or e.g. list(tokens.split(4)) to cut a tensor of token ids into batches"
        )


def check_result(grams: Grams, layers: Mapping[str, nn.Module], count: int) -> None:
    """Some batch was run, some targeted layer ran, and every Gram is finite."""
    if count == 0:
        raise InputError("collect_grams got no batches; pass a non-empty iterable of inputs")
    missing = [n for n in layers if n not in grams]
    if len(missing) == len(layers):
        raise InputError(
            f"no targeted layer ran during calibration ({len(layers)} targeted, e.g. "
            f"{missing[0]!r}); check that the batches drive the model's forward"
        )
    seen: set[int] = set()
    for name, gram in grams.items():
        if id(gram) in seen:
            continue
        seen.add(id(gram))
        if not bool(torch.isfinite(gram).all()):
            raise InputError(
                f"layer {name!r} received non-finite inputs (NaN or inf) during calibration; "
                "check the batches (token ids within the vocabulary, no NaN in float inputs) "
                "and the model's weights"
            )


def _make_hook(collector: GramCollector, name: str, in_features: int) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs=True``) passing the layer's input x [..., in] on."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[-1] != in_features:
            raise InputError(
                f"layer {name!r} expects {in_features} input features, got input "
                f"{tuple(x.shape)}; the model's forward must feed it [..., {in_features}] inputs"
            )
        collector.hook(name, x)

    return hook


@contextmanager
def gram_hooks(layers: Mapping[str, nn.Module]) -> Iterator[GramCollector]:
    """Forward pre-hooks on ``layers`` feeding a :class:`GramCollector`, removed on exit.

    Call ``collector.start_forward()`` before each forward pass; take ``collector.result()``
    after the block. Works with or without autograd (inputs are detached).
    """
    collector = GramCollector(layers)
    handles: list[RemovableHandle] = []
    try:
        for name, module in layers.items():
            hook = _make_hook(collector, name, layer_shape(module)[0])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield collector
    finally:
        for handle in handles:
            handle.remove()
        collector.start_forward()  # drop held inputs


def check_batch(index: int, batch: Any) -> None:
    """Raise InputError for a batch with no tokens (it would add nothing and may crash)."""
    tensors = [batch] if isinstance(batch, Tensor) else []
    if isinstance(batch, Mapping):
        tensors = [v for v in batch.values() if isinstance(v, Tensor)]
    if tensors and all(t.numel() == 0 for t in tensors):
        raise InputError(
            f"calibration batch {index} is empty (shape {tuple(tensors[0].shape)}); drop empty "
            "batches, or pass batches with at least one token"
        )


@contextmanager
def evaluation_pass(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off: the Grams describe the inputs the model really computes) and no
    autograd; every module's training flag is restored on exit, even when a forward raises."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def _run_batches(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    collector: GramCollector,
    progress: bool,
) -> int:
    """Run every batch through ``model`` (see :func:`evaluation_pass`); return the count."""
    device = model_device(model)
    count = 0
    with evaluation_pass(model):
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            check_batch(count, batch)
            collector.start_forward()
            batch = to_device(batch, device)
            if isinstance(batch, Mapping):
                model(**batch)
            else:
                model(batch)
            count += 1
    return count


def collect_grams(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    targets: Patterns = None,
    exclude: Patterns = None,
    progress: bool = True,
) -> Grams:
    """Run ``model`` on ``batches`` and return ``{layer name: Σ xᵀx}`` for the targeted layers.

    ``batches``: tensors (called as ``model(batch)``) or dicts (``model(**batch)``), moved to
    the model's device. ``targets``/``exclude`` select layers as in ``plrd.decompose`` (default:
    every linear layer except output heads). Grams are float64 [in, in] on the layer's device;
    layers reading the same input data share one tensor. ``result.tokens[name]`` counts the
    rows. Runs under ``torch.no_grad()`` in eval mode (dropout off; each module's mode is
    restored afterwards); hooks are removed even if a forward raises. Raises ``InputError``
    when ``batches`` is a single tensor (wrap it in a list), is empty, holds an empty batch,
    never reaches a targeted layer, or drives a layer with non-finite inputs.
    """
    check_batches_argument(model, batches)
    layers = find_targets(model, targets, exclude)
    with gram_hooks(layers) as collector:
        count = _run_batches(model, batches, collector, progress)
    grams = collector.result()
    check_result(grams, layers, count)
    return grams
