"""The training of one family stage: ``Trainer(...).run()``.

AdamW with warmup + cosine decay (``plrd.family.optimizer``), gradient clipping and
accumulation, a token budget, bf16 autocast on CUDA, the objective of ``plrd.family.objectives``
and resumable checkpoints (``plrd.family.train_state``): every ``checkpoint_every`` steps and at
the end, the model and the whole training state (optimizer, scheduler, data position, RNG, step)
are written, and a run started on a work directory that holds a checkpoint resumes from it. Each
step appends a JSON line to ``<work_dir>/train.jsonl``.

Faults: a step whose loss or gradient norm is not finite is skipped (its batch is consumed, the
schedule advances, weights and optimizer state stay); after more than ``max_bad_steps`` skipped
steps in a row the stage stops with ``TrainingDiverged``, keeping the last checkpoint, which
never holds non-finite weights (they are checked before each save).

Data parallel (``plrd.family.distributed``, under torchrun): the model is wrapped in DDP for the
stage (or sharded with FSDP2 and copied back into ``model`` for each checkpoint and at the end);
every rank draws the same global batch of W × ``batch_size`` blocks and trains on its own slice,
so a step consumes W times the tokens; only rank 0 writes the log and checkpoints.
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

import torch
from torch import Tensor

from plrd.errors import InputError, TrainingDiverged
from plrd.family import distributed
from plrd.family.config import TrainConfig
from plrd.family.data import BlockStream
from plrd.family.device import autocast_for, model_device
from plrd.family.objectives import objective_loss
from plrd.family.optimizer import build_optimizer, freeze_embeddings
from plrd.family.train_state import (
    checkpoint_dir,
    has_checkpoint,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from plrd.io.atomic import remove_stale_temporaries, write_text

LOG = "train.jsonl"


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


def _json_float(value: float, digits: int) -> float | None:
    """``value`` rounded, or None for NaN/inf (not valid JSON)."""
    return round(value, digits) if math.isfinite(value) else None


def trim_log(log_path: Path, step: int) -> None:
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


class Trainer:
    """Trains ``model`` in place on ``blocks`` [N, T] for ``cfg.tokens_per_stage`` tokens,
    resuming from ``work_dir``'s checkpoint when there is one (the caller has then loaded the
    checkpoint's weights into ``model``: ``plrd.load(checkpoint_dir(work_dir), model)``).

    ``stage`` (0-based) places the stage in the family: stage k starts in the training data
    where stage k − 1 stopped. ``on_step(step)`` runs after each optimizer step and checkpoint.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: Tensor,
        cfg: TrainConfig,
        work_dir: str | Path,
        *,
        stage: int = 0,
        seed: int = 0,
        teacher: torch.nn.Module | None = None,
        progress: bool = True,
        desc: str = "train",
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.blocks, self.cfg = model, blocks, cfg
        self.work_dir = Path(work_dir)
        self.stage, self.seed, self.teacher = stage, seed, teacher
        self.progress, self.desc, self.on_step = progress, desc, on_step
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.main = distributed.is_main()
        self.total = cfg.steps(int(blocks.shape[1]), self.world)
        self.tokens_per_step = self.world * cfg.batch_size * cfg.grad_accum * int(blocks.shape[1])
        self.device = model_device(model)
        self.sharded = cfg.parallel == "fsdp" and self.world > 1
        self.log_path = self.work_dir / LOG
        self.step_index, self.elapsed, self.last_loss = 0, 0.0, None
        self.skipped, self.bad_in_row, self.saved_step = 0, 0, 0

    # --- the stage ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Prepare, resume or write the first checkpoint, train to the budget, unwrap."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        resuming = distributed.broadcast(has_checkpoint(self.work_dir))  # rank 0 decides
        if self.main:
            remove_stale_temporaries(self.work_dir)  # a killed run's half-written files
        self._prepare()
        if resuming:
            self.resume()
        else:
            self.checkpoint()
        bar = self._progress_bar()
        try:
            while self.step_index < self.total:
                self.step(bar)
        finally:
            if bar is not None:
                bar.close()
        self._finish()
        return TrainResult(
            steps=self.total,
            tokens=self.total * self.tokens_per_step,
            seconds=self.elapsed,
            final_loss=self.last_loss,
            skipped_steps=self.skipped,
        )

    def _prepare(self) -> None:
        """Seeds, frozen embeddings, the DDP/FSDP wrapper, optimizer, schedule, data stream."""
        cfg = self.cfg
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        if not cfg.train_embeddings:
            freeze_embeddings(self.model)
        if self.sharded:  # FSDP2 trains a sharded copy; ``model`` waits on the CPU
            self.net = distributed.shard_fsdp(self.model)
            self.model.to("cpu")
        else:
            self.net = distributed.wrap_ddp(self.model)
        trained = self.net if self.sharded else self.model
        self.optimizer, self.scheduler = build_optimizer(trained, cfg, self.total)
        self.stream = BlockStream(self.blocks, cfg.batch_size * self.world, self.seed)
        self.stream.skip(self.stage * self.total * cfg.grad_accum * cfg.batch_size * self.world)
        self.mine = slice(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size)

    def resume(self) -> None:
        """Restore optimizer, schedule, data position, RNG and counters from the checkpoint."""
        where = checkpoint_dir(self.work_dir)
        state = read_state(where)
        layout = state.get("parallel", "ddp") if state.get("world_size", 1) > 1 else "ddp"
        if layout != ("fsdp" if self.sharded else "ddp"):
            raise InputError(
                f"the checkpoint in {where} was made with parallel={layout}; rerun with "
                f"parallel={layout} and the same number of processes"
            )
        if state["total_steps"] != self.total or state["tokens_per_step"] != self.tokens_per_step:
            raise InputError(
                f"the checkpoint in {where} was made for {state['total_steps']} steps of "
                f"{state['tokens_per_step']} tokens ({state.get('world_size', 1)} process(es)), "
                f"this run asks for {self.total} steps of {self.tokens_per_step} ({self.world}); "
                f"rerun with the original settings and number of processes, or delete "
                f"{self.work_dir}"
            )
        if not self.sharded:
            self.optimizer.load_state_dict(state["optimizer"])
        elif state["optimizer"] is not None:
            distributed.load_full_optimizer_state(self.net, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        self.step_index, self.elapsed = state["step"], state["elapsed"]
        self.last_loss = state["last_loss"]
        self.skipped, self.bad_in_row = state.get("skipped", 0), state.get("bad_in_row", 0)
        self.saved_step = self.step_index
        if self.main:
            trim_log(self.log_path, self.step_index)

    # --- one step ----------------------------------------------------------------------------

    def _forward_backward(self) -> tuple[float, dict[str, float]]:
        """Gradients of the objective over ``grad_accum`` micro-batches; the mean loss."""
        cfg, net = self.cfg, self.net
        loss_sum, parts_sum = 0.0, {}
        for micro in range(cfg.grad_accum):
            batch = self.stream.next_batch()[self.mine].to(self.device)
            teacher_logits = None
            if self.teacher is not None and cfg.objective != "lm":
                with torch.no_grad(), autocast_for(self.device):
                    teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
            last = micro == cfg.grad_accum - 1
            if self.sharded:
                net.set_requires_gradient_sync(last)
            plain = last or net is self.model or self.sharded
            with contextlib.nullcontext() if plain else net.no_sync():
                with autocast_for(self.device):
                    logits = net(input_ids=batch, use_cache=False).logits
                loss, parts = objective_loss(logits, batch, cfg, teacher_logits)
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            del logits, teacher_logits, loss
        return loss_sum, parts_sum

    def step(self, bar=None) -> dict:
        """One optimizer step (or a skipped one); log it, stop on divergence, checkpoint."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self._forward_backward()
        loss, parts, any_bad = _mean_over_ranks(loss, parts, self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.max_grad_norm)
        grad_norm = distributed.full(grad_norm)
        finite = not any_bad and bool(torch.isfinite(grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self._apply(finite, loss)
        self.step_index += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        record = self._record(loss, parts, lr, float(grad_norm), dt, finite)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / dt:.0f}")
            bar.update(1)
        if self.bad_in_row > self.cfg.max_bad_steps:
            raise self._diverged(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (loss "
                f"{loss:g}, gradient norm {float(grad_norm):g}; more than "
                f"max_bad_steps={self.cfg.max_bad_steps})"
            )
        every = self.cfg.checkpoint_every
        if self.step_index == self.total or (every > 0 and self.step_index % every == 0):
            self.checkpoint()
        if self.on_step is not None:
            self.on_step(self.step_index)
        return record

    def _apply(self, finite: bool, loss: float) -> None:
        """The optimizer step, or skip it (weights and optimizer state stay as they were)."""
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
            self.last_loss = loss
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_in_row += 1
        with warnings.catch_warnings():  # a skipped first step is not a misordered call
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
            self.scheduler.step()

    def _record(
        self, loss: float, parts: dict, lr: float, grad_norm: float, dt: float, finite: bool
    ) -> dict:
        record = {
            "step": self.step_index,
            "tokens": self.step_index * self.tokens_per_step,
            "loss": _json_float(loss, 6),
            **{k: _json_float(v, 6) for k, v in parts.items()},
            "lr": lr,
            "grad_norm": _json_float(grad_norm, 4),
            "tokens_per_s": round(self.tokens_per_step / dt, 2),
            "elapsed": round(self.elapsed, 2),
        }
        if not finite:
            record["skipped"] = True
        if self.main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    # --- checkpoints -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the model and the training state (rank 0); never non-finite weights."""
        # DDP: every rank holds the same weights; FSDP: each checks its shards, all stop together
        if self.sharded:
            bad = distributed.first_on_any_rank(all_finite(self.net))
        else:
            bad = all_finite(self.model)
        if bad is not None:
            raise self._diverged(f"parameter {bad} holds NaN or inf values")
        if self.sharded:  # collectives: every rank takes part, rank 0 receives the full tensors
            weights = distributed.full_model_state(self.net, everywhere=False)
            # before the first step there is no state; asking for it would initialise it with a
            # zero-gradient step (torch's get_optimizer_state_dict), shifting Adam's count
            optimizer_state = (
                distributed.full_optimizer_state(self.net, self.optimizer)
                if self.step_index
                else None
            )
            if self.main:
                self.model.load_state_dict(weights)
        else:
            optimizer_state = self.optimizer.state_dict()
        if self.main:
            save_checkpoint(self.work_dir, self.model, self._snapshot(optimizer_state))
        self.saved_step = self.step_index

    def _snapshot(self, optimizer_state: dict | None) -> dict:
        return {
            "step": self.step_index,
            "total_steps": self.total,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.world,
            "parallel": self.cfg.parallel,
            "elapsed": self.elapsed,
            "last_loss": self.last_loss,
            "skipped": self.skipped,
            "bad_in_row": self.bad_in_row,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "config": asdict(self.cfg),
        }

    def _diverged(self, why: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{self.desc}: training stopped at step {self.step_index} of {self.total}: {why}; "
            f"the last good checkpoint (step {self.saved_step}) is kept in "
            f"{checkpoint_dir(self.work_dir)}; lower the learning rate, check the data or "
            "allow more skipped steps (max_bad_steps), then run the same command again to "
            "resume from it"
        )

    def _progress_bar(self):
        if not (self.progress and self.main and self.step_index < self.total):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total,
            initial=self.step_index,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
        )

    def _finish(self) -> None:
        """The trained weights back into the plain model (FSDP: on every rank, a collective)."""
        if self.sharded:
            weights = distributed.full_model_state(self.net, everywhere=True)
            self.model.to(self.device)
            self.model.load_state_dict(weights)
        self.net = None  # drops DDP's gradient hooks and buckets, or the sharded copy
        self.model.eval()
