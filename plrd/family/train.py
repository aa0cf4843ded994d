"""The training loop of one family stage: AdamW, linear warmup + cosine decay, gradient clipping
and accumulation, a token budget, bf16 autocast on CUDA, resumable checkpoints.

Objectives (per predicted token, averaged):
  lm      cross-entropy of the next token, −log p_s(x[t+1] | x[≤t])
  kd      τ² · KL(p_t^τ ‖ p_s^τ) to the teacher (the parent), softmax at temperature τ
  lm+kd   (1 − α)·lm + α·kd

Faults: a step whose loss or gradient norm is not finite (NaN/inf) is skipped: its batch is
consumed and the schedule advances, but the weights and the optimizer state are left as they
were. After more than ``max_bad_steps`` skipped steps in a row the stage stops with
``TrainingDiverged``; the last checkpoint, which never holds non-finite weights (they are
checked before each save), stays in place for a resume.

A checkpoint (``<work_dir>/checkpoint``) holds the model (``plrd.save`` format: the factored
layers are rebuilt by ``plrd.load``), the optimizer, the scheduler, the data position, the RNG
states and the step; it is written atomically every ``checkpoint_every`` steps and at the end.
No pickle: the training state is ``train_state.safetensors`` (every tensor: optimizer moments,
RNG states) + ``train_state.json`` (everything else, and the tensors file's size and SHA-256,
checked before it is read).
Each step appends a JSON line to ``<work_dir>/train.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from plrd.errors import TrainingDiverged
from plrd.family import distributed
from plrd.family.data import BlockStream
from plrd.family.evaluate import autocast_for, model_device, next_token_nll
from plrd.io.atomic import atomic_dir, remove_stale_temporaries, write_text

OBJECTIVES = ("lm", "kd", "lm+kd")
PARALLEL = ("ddp", "fsdp")
CHECKPOINT = "checkpoint"
LOG = "train.jsonl"
STATE = "train_state.json"
STATE_TENSORS = "train_state.safetensors"


@dataclass
class TrainConfig:
    """Hyper-parameters of one stage. ``tokens`` is the budget; steps = ⌈tokens / (B·T·accum)⌉."""

    tokens: int
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.25
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    objective: str = "lm"
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0
    checkpoint_every: int = 10
    train_embeddings: bool = False
    stage: int = 0
    seed: int = 0
    progress: bool = True
    max_bad_steps: int = 10
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        if self.parallel not in PARALLEL:
            raise ValueError(
                f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.tokens < 0:
            raise ValueError(f"token budget must be >= 0, got {self.tokens}")
        if self.max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"batch size and grad accumulation must be >= 1, got {self.batch_size}, "
                f"{self.grad_accum}"
            )

    def steps(self, block_size: int, world_size: int = 1) -> int:
        """Optimizer steps; each consumes ``world_size`` × batch × accum × block tokens."""
        per_step = world_size * self.batch_size * self.grad_accum * block_size
        return math.ceil(self.tokens / per_step) if self.tokens > 0 else 0


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float | None
    skipped_steps: int = 0


def all_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None when all are finite.

    A sharded (DTensor) parameter is checked on this rank's shard."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(distributed.local(p.detach())).all()):
            return name
    return None


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """τ² · mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)); logits [B, T, V]."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def objective_loss(
    logits: Tensor,
    input_ids: Tensor,
    cfg: TrainConfig,
    teacher_logits: Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of ``cfg.objective`` and its parts (floats) for logging."""
    parts: dict[str, float] = {}
    lm = kd = None
    if cfg.objective in ("lm", "lm+kd"):
        lm = next_token_nll(logits, input_ids, reduction="mean")
        parts["lm"] = float(lm.detach())
    if cfg.objective in ("kd", "lm+kd"):
        if teacher_logits is None:
            raise ValueError(f"objective {cfg.objective!r} needs a teacher model")
        kd = kd_loss(logits, teacher_logits, cfg.kd_temperature)
        parts["kd"] = float(kd.detach())
    if lm is not None and kd is not None:
        loss = (1.0 - cfg.kd_alpha) * lm + cfg.kd_alpha * kd
    else:
        loss = lm if lm is not None else kd
    return loss, parts


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Stop training the token embeddings and the output head (tied or not).

    With Adam, every row of the output embedding moves by about ``lr`` per step, even the rows of
    tokens absent from the batch (the softmax gives them tiny gradients that Adam normalises), so
    a few thousand tokens of narrow text shift the logits of the whole vocabulary.
    """
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)


def checkpoint_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / CHECKPOINT


def has_checkpoint(work_dir: str | Path) -> bool:
    return (checkpoint_dir(work_dir) / STATE).is_file()


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_tensors(obj: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    """A JSON-ready copy of ``obj`` whose tensors are moved into ``tensors`` (by path)."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep them as pairs
        items = [[k, _split_tensors(v, tensors, f"{path}.{k}")] for k, v in obj.items()]
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [_split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a training state")


def _join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``_split_tensors``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join_tensors(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
    return obj


def write_state(directory: Path, state: dict) -> None:
    """``state`` (nested dicts/lists of tensors and plain values) as safetensors + JSON."""
    from safetensors.torch import save_file

    from plrd.io.integrity import file_record

    tensors: dict[str, Tensor] = {}
    tree = _split_tensors(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    record = file_record(directory / STATE_TENSORS)
    write_text(directory / STATE, json.dumps({"tensors": record, "state": tree}) + "\n")


def read_state(directory: Path, load: bool = True) -> dict:
    """The state written by ``write_state``; ValueError naming the file if it is damaged.

    With ``load=False`` only the files are checked (the JSON tree is returned, tensors unread).
    """
    from safetensors.torch import load_file

    from plrd.io.integrity import check_record, read_safetensors_header

    path = directory / STATE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        record, tree = doc["tensors"], doc["state"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot be read ({err}); the checkpoint is damaged") from None
    tensors_path = directory / STATE_TENSORS
    if not tensors_path.is_file():
        raise ValueError(f"{tensors_path} not found; the checkpoint is incomplete")
    try:
        check_record(tensors_path, record["bytes"], record["sha256"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: no valid record of {STATE_TENSORS}; damaged") from None
    read_safetensors_header(tensors_path)
    if not load:
        return tree
    return _join_tensors(tree, load_file(str(tensors_path)))


def verify_state(directory: Path) -> None:
    """Check the training state files in ``directory`` without loading them (ValueError)."""
    read_state(directory, load=False)


def save_checkpoint(work_dir: Path, model: torch.nn.Module, state: dict) -> None:
    """Write model (``plrd.save``) + training state into ``work_dir/checkpoint`` atomically."""
    from plrd.io.checkpoint import save

    with atomic_dir(checkpoint_dir(work_dir)) as tmp:
        save(model, tmp)
        write_state(tmp, state)


def _json_float(value: float, digits: int) -> float | None:
    """``value`` rounded, or None for NaN/inf (not valid JSON)."""
    return round(value, digits) if math.isfinite(value) else None


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (they are redone after a resume)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break
    write_text(log_path, "".join(k + "\n" for k in kept))


def _mean_over_ranks(
    loss: float, parts: dict[str, float], device: torch.device
) -> tuple[float, dict[str, float], bool]:
    """Loss and its parts averaged over the data-parallel ranks, and whether any rank's loss
    was not finite (then every rank skips the step). One process: returned as they are."""
    if not distributed.is_distributed():
        return loss, parts, not math.isfinite(loss)
    names = sorted(parts)
    values = [loss, 0.0 if math.isfinite(loss) else 1.0] + [parts[k] for k in names]
    stats = distributed.all_reduce(torch.tensor(values, dtype=torch.float64, device=device))
    stats = stats.cpu().tolist()
    world = distributed.world_size()
    return (
        stats[0] / world,
        {k: v / world for k, v in zip(names, stats[2:], strict=True)},
        (stats[1] > 0 or not math.isfinite(stats[0])),
    )


def train_stage(
    model: torch.nn.Module,
    blocks: Tensor,
    cfg: TrainConfig,
    work_dir: str | Path,
    teacher: torch.nn.Module | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``blocks`` [N, T] for ``cfg.tokens`` tokens.

    If ``work_dir`` holds a checkpoint, the optimizer, scheduler, data position, RNG and step are
    restored from it; the caller must have loaded the checkpoint's model weights into ``model``
    (``plrd.load(checkpoint_dir(work_dir), model)``). ``on_step(step)`` runs after each
    optimizer step and checkpoint.

    Data parallel (``plrd.family.distributed``, under torchrun): the model is wrapped in
    ``DistributedDataParallel`` for this stage; every rank draws the same global batch of
    W × ``batch_size`` blocks and trains on its own slice of it, so a step consumes W times the
    tokens and the budget gives W times fewer steps; only rank 0 writes the log and checkpoints
    (every rank reads a checkpoint to resume).
    """
    world, rank = distributed.world_size(), distributed.rank()
    main = distributed.is_main()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    resuming = distributed.broadcast(has_checkpoint(work_dir))  # rank 0 decides, before writes
    if main:
        remove_stale_temporaries(work_dir)  # a killed run's half-written checkpoint or log
    block_size = int(blocks.shape[1])
    total = cfg.steps(block_size, world)
    tokens_per_step = world * cfg.batch_size * cfg.grad_accum * block_size
    device = model_device(model)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if not cfg.train_embeddings:
        freeze_embeddings(model)
    # the trained module, rebuilt each stage (the parameters are new after a truncation):
    # DDP wraps ``model``; FSDP2 trains a sharded copy, copied back into ``model`` for each
    # checkpoint and at the end (``model`` waits on the CPU meanwhile)
    sharded = cfg.parallel == "fsdp" and world > 1
    if sharded:
        net = distributed.shard_fsdp(model)
        model.to("cpu")
    else:
        net = distributed.wrap_ddp(model)
    optimizer = torch.optim.AdamW(
        _param_groups(net if sharded else model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = min(total, max(1, round(cfg.warmup * total))) if cfg.warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio)
    )
    stream = BlockStream(blocks, cfg.batch_size * world, cfg.seed)  # the global batch
    # stage k starts where stage k-1 stopped: a stage does not retrain on its parent's blocks
    stream.skip(cfg.stage * total * cfg.grad_accum * cfg.batch_size * world)
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    step, elapsed, last_loss = 0, 0.0, None
    skipped, bad_in_row = 0, 0
    log_path = work_dir / LOG

    if resuming:
        state = read_state(checkpoint_dir(work_dir))
        layout = state.get("parallel", "ddp") if state.get("world_size", 1) > 1 else "ddp"
        if layout != ("fsdp" if sharded else "ddp"):
            raise ValueError(
                f"the checkpoint in {checkpoint_dir(work_dir)} was made with --parallel "
                f"{layout}; rerun with --parallel {layout} and the same number of processes"
            )
        if state["total_steps"] != total or state["tokens_per_step"] != tokens_per_step:
            procs = state.get("world_size", 1)
            raise ValueError(
                f"the checkpoint in {checkpoint_dir(work_dir)} was made for {state['total_steps']}"
                f" steps of {state['tokens_per_step']} tokens ({procs} process(es)), this run asks "
                f"for {total} steps of {tokens_per_step} ({world}); rerun with the original "
                f"settings and number of processes, or delete {work_dir}"
            )
        if sharded:
            if state["optimizer"] is not None:
                distributed.load_full_optimizer_state(net, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        _set_rng_state(state["rng"])
        step, elapsed, last_loss = state["step"], state["elapsed"], state["last_loss"]
        skipped, bad_in_row = state.get("skipped", 0), state.get("bad_in_row", 0)
        if main:
            _trim_log(log_path, step)
    saved_step = step

    def snapshot(optimizer_state: dict) -> dict:
        return {
            "step": step,
            "total_steps": total,
            "tokens_per_step": tokens_per_step,
            "world_size": world,
            "parallel": cfg.parallel,
            "elapsed": elapsed,
            "last_loss": last_loss,
            "skipped": skipped,
            "bad_in_row": bad_in_row,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "stream": stream.state_dict(),
            "rng": _rng_state(),
            "config": asdict(cfg),
        }

    def stop(why: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{desc}: training stopped at step {step} of {total}: {why}; the last good "
            f"checkpoint (step {saved_step}) is kept in {checkpoint_dir(work_dir)}; lower the "
            "learning rate, check the data or allow more skipped steps (max_bad_steps), then "
            "run the same command again to resume from it"
        )

    def checkpoint() -> None:
        nonlocal saved_step
        # DDP: every rank holds the same weights; FSDP: each checks its shards, all stop together
        bad = distributed.first_on_any_rank(all_finite(net)) if sharded else all_finite(model)
        if bad is not None:
            raise stop(f"parameter {bad} holds NaN or inf values")
        if sharded:  # collectives: every rank takes part, rank 0 receives the full tensors
            weights = distributed.full_model_state(net, everywhere=False)
            # before the first step there is no state; asking for it would initialise it
            # with a zero-gradient step (torch's get_optimizer_state_dict), shifting Adam's count
            optimizer_state = distributed.full_optimizer_state(net, optimizer) if step else None
            if main:
                model.load_state_dict(weights)
        else:
            optimizer_state = optimizer.state_dict()
        if main:
            save_checkpoint(work_dir, model, snapshot(optimizer_state))
        saved_step = step

    if step == 0 and not resuming:
        checkpoint()

    bar = None
    if cfg.progress and main and step < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)

    net.train()
    if teacher is not None:
        teacher.eval()
    try:
        while step < total:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, parts_sum = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = stream.next_batch()[mine].to(device)
                teacher_logits = None
                if teacher is not None and cfg.objective != "lm":
                    with torch.no_grad(), autocast_for(device):
                        teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                last = micro == cfg.grad_accum - 1
                if sharded:
                    net.set_requires_gradient_sync(last)
                sync = (
                    contextlib.nullcontext() if last or net is model or sharded else net.no_sync()
                )
                with sync:
                    with autocast_for(device):
                        logits = net(input_ids=batch, use_cache=False).logits
                    loss, parts = objective_loss(logits, batch, cfg, teacher_logits)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
                del logits, teacher_logits, loss
            loss_sum, parts_sum, any_bad = _mean_over_ranks(loss_sum, parts_sum, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            grad_norm = distributed.full(grad_norm)
            finite = not any_bad and bool(torch.isfinite(grad_norm))
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
                bad_in_row = 0
                last_loss = loss_sum
            else:  # skip the update: weights and optimizer state stay as they were
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                bad_in_row += 1
            with warnings.catch_warnings():  # a skipped first step is not a misordered call
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
                scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            record = {
                "step": step,
                "tokens": step * tokens_per_step,
                "loss": _json_float(loss_sum, 6),
                **{k: _json_float(v, 6) for k, v in parts_sum.items()},
                "lr": lr,
                "grad_norm": _json_float(float(grad_norm), 4),
                "tokens_per_s": round(tokens_per_step / dt, 2),
                "elapsed": round(elapsed, 2),
            }
            if not finite:
                record["skipped"] = True
            if main:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
                bar.update(1)
            if bad_in_row > cfg.max_bad_steps:
                raise stop(
                    f"{bad_in_row} steps in a row had a non-finite loss or gradient (loss "
                    f"{loss_sum:g}, gradient norm {float(grad_norm):g}; more than "
                    f"max_bad_steps={cfg.max_bad_steps})"
                )
            if step == total or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0):
                checkpoint()
            if on_step is not None:
                on_step(step)
    finally:
        if bar is not None:
            bar.close()
    if sharded:  # the trained weights back into the plain model, on every rank (a collective)
        weights = distributed.full_model_state(net, everywhere=True)
        model.to(device)
        model.load_state_dict(weights)
    net = None  # drops DDP's gradient hooks and buckets, or the sharded copy
    model.eval()
    return TrainResult(
        steps=total,
        tokens=total * tokens_per_step,
        seconds=elapsed,
        final_loss=last_loss,
        skipped_steps=skipped,
    )
