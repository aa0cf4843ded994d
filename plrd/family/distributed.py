"""Data parallelism for ``torchrun --nproc_per_node N -m plrd family ...``.

torchrun starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment; ``init`` turns that into the default process group (NCCL
for CUDA, gloo for CPU). Without those variables every function here is the single-process
identity (rank 0 of 1), so the rest of plrd calls them unconditionally.

How the family uses them (every rank runs the same program on the same inputs):
  - calibration: each rank collects Grams Σ xᵀx on its shard of the calibration blocks, then
    ``all_reduce_grams`` sums them, so every rank decomposes from identical Grams and picks
    identical ranks (checked with ``same_on_all_ranks``);
  - training: ``DistributedDataParallel`` averages gradients; the token budget is global (one
    step consumes world_size × batch × seq tokens); each rank trains on its own slice of the
    global batch;
  - evaluation: each rank evaluates its shard of the held-out blocks; sums are all-reduced;
  - files: only rank 0 writes (checkpoints, members, family.json, plots, logs) and prints;
    decisions that depend on files (resume or not) are taken by rank 0 and broadcast.
"""

from __future__ import annotations

import gc
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from plrd.errors import InputError, PlrdError

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed; torchrun's RANK before ``init``)."""
    if is_distributed():
        return _dist().get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """Number of data-parallel processes (1 when not distributed)."""
    if is_distributed():
        return _dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK), 0 when not launched."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Start the process group from torchrun's environment (once); return this rank's device.

    NCCL for CUDA devices (each rank takes ``cuda:LOCAL_RANK``), gloo otherwise. Not launched
    by torchrun: nothing happens and ``device`` is returned unchanged.
    """
    if not launched():
        return device
    dist = _dist()
    if not dist.is_available():
        raise InputError("torchrun started several processes but torch.distributed is missing")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown(clean: bool = True) -> None:
    """Destroy the process group, if one was started.

    ``clean`` (every rank got here without an error): first collect garbage (a sharded model's
    reference cycles may still hold communication buffers) and wait for every rank, so no
    collective is in flight when the group goes; a gloo group destroyed under pending work
    aborts the process. After an error, only destroy (the other ranks may never arrive).
    """
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if clean:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        _dist().barrier()


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """``tensor`` reduced over the ranks in place (``sum`` or ``max``); returned for chaining."""
    if is_distributed():
        dist = _dist()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_reduce_grams(grams: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Sum each Gram Σ xᵀx over the ranks in place, so Σ over all ranks' tokens is everywhere.

    Layers sharing one Gram tensor (same input) are reduced once. ``grams.tokens`` (rows per
    layer), when present, is summed too.
    """
    if not is_distributed():
        return grams
    seen: set[int] = set()
    for gram in grams.values():
        if id(gram) not in seen:
            seen.add(id(gram))
            all_reduce(gram)
    tokens = getattr(grams, "tokens", None)
    if tokens:
        names = sorted(tokens)
        counts = torch.tensor([tokens[n] for n in names], dtype=torch.float64)
        all_reduce(counts)
        for n, c in zip(names, counts.tolist(), strict=True):
            tokens[n] = int(c)
    return grams


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (any picklable value; identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(obj: Any, what: str) -> None:
    """Raise PlrdError unless ``obj`` is equal on every rank (``what`` names it)."""
    if not is_distributed():
        return
    gathered: list[Any] = [None] * world_size()
    _dist().all_gather_object(gathered, obj)
    for r, other in enumerate(gathered):
        if other != gathered[0]:
            raise PlrdError(
                f"{what} differs between rank 0 and rank {r}; the ranks must compute the same "
                "result (same inputs, same software on every machine)"
            )


def shard(blocks: Tensor) -> Tensor:
    """This rank's share of ``blocks`` [N, ...]: rows rank, rank + W, rank + 2W, ..."""
    return blocks[rank() :: world_size()] if world_size() > 1 else blocks


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn`` on rank 0 only (file writes, prints); None elsewhere."""
    return fn(*args, **kwargs) if is_main() else None


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    Built after the caller froze what must not train (DDP only syncs parameters that require
    grad); rank 0's weights are broadcast to the other ranks on construction.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    # buffers (rotary tables) are computed identically on every rank: no sync per forward
    accepted = inspect.signature(DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{key: False})


# FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state
# sharded over the ranks instead of replicated. The training loop shards a copy of the model
# and copies the full weights back into the plain model for checkpoints and at the end.


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` sharded with FSDP2: each block named in ``model._no_split_modules``
    (Hugging Face's decoder layers) is one FSDP unit, the rest (embeddings, final norm, head)
    the root unit. Its parameters are DTensor shards; ``LowRankLinear`` factors shard like any
    weight (rows of ``down`` and ``up``)."""
    import copy

    from torch.distributed.fsdp import fully_shard

    net = copy.deepcopy(model)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in net.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(net)
    return net


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(net: torch.nn.Module, everywhere: bool) -> dict[str, Tensor]:
    """The unsharded weights of an FSDP ``net`` (a collective: every rank calls it): on every
    rank (``everywhere``) or, on CPU, on rank 0 only (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_options(cpu_offload=not everywhere))


def full_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state (keyed by parameter name) on rank 0, on CPU; a collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Shard a ``full_optimizer_state`` back into ``optimizer`` (every rank passes it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(net, optimizer, optim_state_dict=state, options=_options())


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole value of a DTensor (a collective); a plain tensor as it is."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def first_on_any_rank(value: T | None) -> T | None:
    """The first non-None ``value`` in rank order (a collective); ``value`` in one process."""
    if not is_distributed():
        return value
    gathered: list[Any] = [None] * world_size()
    _dist().all_gather_object(gathered, value)
    return next((v for v in gathered if v is not None), None)
