"""One stage of a family: the member of one size.

    skip it if finished earlier (its files verify) → or resume its interrupted training →
    or: start from the previous member, calibrate, decompose, evaluate (zero-shot) →
    train → evaluate → save the member → record it in family.json

The files of a stage: ``members/size-S/`` (the member, written whole under a temporary name and
renamed), ``stages/size-S/`` (``stage.json`` with the decomposition's results,
``decompose.txt``, ``train.jsonl`` and, while training, ``checkpoint/``).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plrd.core.calibrate import collect_grams
from plrd.core.counting import count_parameters, format_params
from plrd.core.fisher import collect_both_grams, collect_output_grams
from plrd.core.sequential import decompose_sequentially
from plrd.core.surgery import DecompositionReport, plan_decomposition
from plrd.errors import DamagedFileError
from plrd.family import distributed
from plrd.family.card import CARD_FILE, member_card
from plrd.family.config import FamilyConfig
from plrd.family.data import Corpus
from plrd.family.evaluate import EvalResult, GeneralResult, evaluate_general, evaluate_sharded
from plrd.family.record import add_member, member_path, size_key, write_record
from plrd.family.train_state import checkpoint_dir, has_checkpoint, verify_state
from plrd.family.trainer import Trainer, TrainResult
from plrd.io.atomic import read_json, write_json, write_text
from plrd.io.checkpoint import load, verify_checkpoint
from plrd.io.hf import empty_model
from plrd.io.members import MEMBER_FILE, load_pretrained, save_member, verify_member

STAGE_FILE = "stage.json"
REPORT_FILE = "decompose.txt"


@dataclass
class FamilyRun:
    """What every stage of one run shares: its settings, data, parent and record."""

    cfg: FamilyConfig
    out: Path
    device: torch.device
    corpus: Corpus
    eval_blocks: Tensor
    calib_blocks: Tensor
    general_blocks: Tensor
    tokenizer: Any
    parent: torch.nn.Module
    parent_params: int
    record: dict
    say: Callable[[str], None]
    on_step: Callable[[int], None] | None = None

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @property
    def teacher(self) -> torch.nn.Module | None:
        return self.parent if self.cfg.train.objective != "lm" else None


@dataclass
class Previous:
    """Where the next stage starts: the last member's directory, and its model when it is
    still in memory."""

    directory: Path | None = None
    model: torch.nn.Module | None = None


@dataclass
class StagePaths:
    size: float
    rel: str
    member_dir: Path
    stage_dir: Path

    @classmethod
    def of(cls, out: Path, size: float) -> StagePaths:
        rel = member_path(size)
        return cls(size, rel, out / rel, out / "stages" / size_key(size))


def calibrate_and_decompose(
    model: torch.nn.Module,
    keep: float,
    calib: Tensor,
    method: str = "whiten",
    allocation: str = "uniform",
    batch_size: int = 8,
    progress: bool = True,
    min_saving: float = 0.0,
    calibration: str = "uncut",
) -> DecompositionReport:
    """Grams on ``calib`` blocks [N, T] (input Grams to whiten; output-gradient Grams for
    ``fisher``), ranks from them, then the cut in place: with those Grams of the uncut model
    (``calibration="uncut"``, as ``plrd.decompose``), or block by block on the cut model's
    inputs (``"sequential"``, ``"refit"``: ``plrd.core.sequential``). ``min_saving`` as in
    ``plrd.decompose``.

    Data parallel: each rank collects Grams on its shard of ``calib`` and they are summed over
    the ranks (all ranks use all blocks when there are fewer blocks than ranks), so every rank
    decomposes identically; the resulting ranks are checked to agree.
    """
    split = distributed.world_size() > 1 and len(calib) >= distributed.world_size()
    batches = list((distributed.shard(calib) if split else calib).split(batch_size))
    grams = output_grams = None
    if method == "whiten" and allocation == "fisher":
        grams, output_grams = collect_both_grams(model, batches, progress=progress)
    elif method == "whiten":
        grams = collect_grams(model, batches, progress=progress)
    elif allocation == "fisher":
        output_grams = collect_output_grams(model, batches, progress=progress)
    reduce = distributed.all_reduce_grams if split else None
    if reduce is not None:
        for collected in (grams, output_grams):
            if collected is not None:
                reduce(collected)
    planned = plan_decomposition(
        model,
        keep,
        grams=grams,
        allocation=allocation,
        method=method,
        progress=progress,
        output_grams=output_grams,
        min_saving=min_saving,
    )
    if calibration == "uncut":
        report = planned.apply(model, progress)
    else:
        refit = calibration == "refit"
        report = decompose_sequentially(
            model, planned, batches, refit, progress=progress, reduce=reduce
        )
    ranks = [(row.name, row.rank_after) for row in report.layers]
    distributed.same_on_all_ranks(ranks, "the decomposition's ranks")
    return report


def run_stage(run: FamilyRun, index: int, size: float, previous: Previous) -> Previous:
    """Build (or skip, or finish) the member of ``size``; where the next stage starts."""
    paths = StagePaths.of(run.out, size)
    if finished_earlier(run, paths):
        return Previous(paths.member_dir, None)
    started = time.perf_counter()
    model, stage = resume_interrupted(run, paths)
    if model is None:
        model = starting_model(run, previous)
        stage = decompose_stage(run, model, paths, started)
    result = train(run, model, index, paths)
    after = time.perf_counter()
    trained = evaluate_sharded(model, run.eval_blocks, run.cfg.eval_batch_size)
    general = evaluate_general(model, run.parent, run.general_blocks, run.cfg.eval_batch_size)
    entry = member_entry(run, model, paths, stage, result, trained, general, after)
    save_and_record(run, model, paths, entry)
    run.say(
        f"{paths.rel}: after {result.tokens:,} tokens held-out ppl {stage['zero_shot_ppl']:.2f} "
        f"-> {trained.ppl:.2f}, general ppl {stage['zero_shot_general_ppl']:.2f} -> "
        f"{general.ppl:.2f}, KL to parent {general.kl_to_parent:.3f}; "
        f"{trained.tokens_per_s:.0f} tok/s"
    )
    return Previous(paths.member_dir, model)


def finished_earlier(run: FamilyRun, paths: StagePaths) -> bool:
    """True when the member was finished by an earlier run and its files verify (recorded now
    if it was saved just before its family.json entry); a damaged one is rebuilt."""
    known = next((m for m in run.record["members"] if m["size"] == paths.size), None)
    verdict = None
    if run.main and (known is not None or (paths.member_dir / MEMBER_FILE).is_file()):
        try:
            digest = verify_member(paths.member_dir, (known or {}).get("sha256"))
            verdict = ("verified", digest, known or read_json(paths.member_dir / MEMBER_FILE))
        except DamagedFileError as err:
            verdict = ("damaged", str(err), None)
    verdict = distributed.broadcast(verdict)  # rank 0's files decide for every rank
    if verdict is None:
        return False
    kind, detail, saved = verdict
    if kind == "damaged":
        run.say(f"{paths.rel}: finished earlier but damaged ({detail}); rebuilding it")
        return False
    if known is None or known.get("sha256") != detail:
        add_member(run.record, {**saved, "sha256": detail})
        distributed.on_main(write_record, run.out, run.record)
        run.say(f"{paths.rel}: finished earlier, recorded")
    else:
        run.say(f"{paths.rel}: finished earlier, skipped (weights verified)")
    return True


def interrupted_stage(stage_dir: Path) -> bool:
    """True when ``stage_dir`` holds an interrupted stage whose checkpoint verifies, False when
    it holds none; ``DamagedFileError`` when the checkpoint or stage.json is damaged."""
    if not (has_checkpoint(stage_dir) and (stage_dir / STAGE_FILE).is_file()):
        return False
    try:
        read_json(stage_dir / STAGE_FILE)
    except ValueError as err:
        raise DamagedFileError(f"{stage_dir / STAGE_FILE}: not valid JSON ({err})") from None
    verify_state(checkpoint_dir(stage_dir))
    try:
        verify_checkpoint(checkpoint_dir(stage_dir))
    except ValueError as err:
        raise DamagedFileError(str(err).splitlines()[0]) from None
    return True


def resume_interrupted(
    run: FamilyRun, paths: StagePaths
) -> tuple[torch.nn.Module | None, dict | None]:
    """The model and stage record of an interrupted stage to continue, or ``(None, None)``
    (none, or its checkpoint is damaged and the stage starts over)."""
    verdict = None
    if run.main:
        try:
            verdict = ("resume", "") if interrupted_stage(paths.stage_dir) else None
        except DamagedFileError as err:
            verdict = ("damaged", str(err).splitlines()[0])
    verdict = distributed.broadcast(verdict)
    model = stage = None
    if verdict is not None and verdict[0] == "damaged":
        run.say(
            f"{paths.rel}: the interrupted stage's checkpoint is damaged ({verdict[1]}); "
            "starting the stage again"
        )
    elif verdict is not None:
        stage = read_json(paths.stage_dir / STAGE_FILE)
        skeleton = empty_model(run.parent.config)
        model = load(checkpoint_dir(paths.stage_dir), skeleton).to(run.device)
        run.say(f"{paths.rel}: resuming the interrupted stage from its last checkpoint")
    distributed.barrier()  # every rank has read the checkpoint before rank 0 changes files
    return model, stage


def starting_model(run: FamilyRun, previous: Previous) -> torch.nn.Module:
    """The previous member (in memory or from disk), or a copy of the parent for the first."""
    if previous.model is not None:
        return previous.model
    if previous.directory is not None:
        return load_pretrained(previous.directory, run.device)
    return copy.deepcopy(run.parent)


def decompose_stage(
    run: FamilyRun, model: torch.nn.Module, paths: StagePaths, started: float
) -> dict:
    """Calibrate and decompose ``model`` in place to ``size`` × the parent's parameters, then
    measure it zero-shot; returns (and writes) the stage record."""
    cfg = run.cfg
    for p in model.parameters():
        p.requires_grad_(True)
    params_now = count_parameters(model)
    keep = paths.size * run.parent_params / params_now
    run.say(
        f"{paths.rel}: decomposing {format_params(params_now)} -> "
        f"{format_params(int(paths.size * run.parent_params))} (keep {keep:.3f}, "
        f"{cfg.method}, {cfg.allocation})"
    )
    if run.main:
        if paths.stage_dir.exists():
            shutil.rmtree(paths.stage_dir)
        paths.stage_dir.mkdir(parents=True)
    distributed.barrier()
    report = calibrate_and_decompose(
        model,
        keep,
        run.calib_blocks,
        cfg.method,
        cfg.allocation,
        cfg.eval_batch_size,
        cfg.progress and run.main,
        cfg.min_saving,
        cfg.calibration,
    )
    distributed.on_main(write_text, paths.stage_dir / REPORT_FILE, f"{report}\n")
    zero = evaluate_sharded(model, run.eval_blocks, cfg.eval_batch_size, timing_repeats=0)
    general = evaluate_general(model, run.parent, run.general_blocks, cfg.eval_batch_size)
    stage = {
        "size": paths.size,
        "keep": keep,
        "params": count_parameters(model),
        "zero_shot_ppl": zero.ppl,
        "zero_shot_general_ppl": general.ppl,
        "zero_shot_kl_to_parent": general.kl_to_parent,
        "prep_seconds": time.perf_counter() - started,
    }
    distributed.on_main(write_json, paths.stage_dir / STAGE_FILE, stage)
    run.say(
        f"{paths.rel}: {format_params(stage['params'])} parameters, zero-shot held-out ppl "
        f"{zero.ppl:.2f}, general ppl {general.ppl:.2f}, KL to parent {general.kl_to_parent:.3f}"
    )
    return stage


def train(run: FamilyRun, model: torch.nn.Module, index: int, paths: StagePaths) -> TrainResult:
    """Train the stage's budget (resuming from its checkpoint when there is one)."""
    for p in model.parameters():
        p.requires_grad_(True)
    trainer = Trainer(
        model,
        run.corpus.train,
        run.cfg.train,
        paths.stage_dir,
        stage=index,
        seed=run.cfg.seed,
        teacher=run.teacher,
        progress=run.cfg.progress and run.main,
        desc=paths.rel,
        on_step=run.on_step,
    )
    return trainer.run()


def member_entry(
    run: FamilyRun,
    model: torch.nn.Module,
    paths: StagePaths,
    stage: dict,
    result: TrainResult,
    trained: EvalResult,
    general: GeneralResult,
    after_training: float,
) -> dict:
    """The member's entry in family.json (its sha256 is added once it is saved)."""
    seconds = stage["prep_seconds"] + result.seconds + (time.perf_counter() - after_training)
    return {
        "size": paths.size,
        "params": count_parameters(model),
        "path": paths.rel,
        "tokens": result.tokens,
        "zero_shot_ppl": stage["zero_shot_ppl"],
        "held_out_ppl": trained.ppl,
        "zero_shot_general_ppl": stage["zero_shot_general_ppl"],
        "general_ppl": general.ppl,
        "zero_shot_kl_to_parent": stage["zero_shot_kl_to_parent"],
        "kl_to_parent": general.kl_to_parent,
        "tokens_per_s": trained.tokens_per_s,
        "seconds": round(seconds, 1),
        "train_seconds": result.seconds,
        "keep": stage["keep"],
        "final_train_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
        "world_size": distributed.world_size(),
    }


def save_and_record(run: FamilyRun, model: torch.nn.Module, paths: StagePaths, entry: dict) -> None:
    """Save the member, check it reads back, then record it: from here on it is finished."""
    verdict = None
    if run.main:
        report = paths.stage_dir / REPORT_FILE
        files = {REPORT_FILE: report.read_text()} if report.is_file() else {}
        files[CARD_FILE] = member_card(
            model, run.cfg.model, run.parent_params, entry, run.cfg.recipe()
        )
        save_member(model, run.tokenizer, paths.member_dir, entry, files)
        try:
            verdict = ("verified", verify_member(paths.member_dir))
        except DamagedFileError as err:
            verdict = ("damaged", str(err))
    kind, detail = distributed.broadcast(verdict)  # every rank stops if it did not read back
    if kind == "damaged":
        raise DamagedFileError(f"{paths.rel} was saved but does not read back: {detail}")
    entry["sha256"] = detail
    add_member(run.record, entry)
    if run.main:
        write_record(run.out, run.record)
        shutil.rmtree(checkpoint_dir(paths.stage_dir), ignore_errors=True)
