"""The progressive schedule: parent → size s₁ → train → s₂ → train → … , every stage saved.

For each size s (a fraction of the PARENT's parameter count P), ``plrd.family.stage`` takes
the current model (the parent, then the previous member), collects Grams Σ xᵀx of its targeted
layers on calibration blocks, decomposes it in place to keep = s·P / params(current), measures
it, trains ``tokens_per_stage`` tokens, measures it again and saves it as a member.

Layout of ``out``::

    family.json            recipe, corpus, parent, and one entry per finished member
    family.png             params vs held-out perplexity (zero-shot and trained, parent marked)
    members/size-0.90/     a member: plrd.save weights + plrd.json, HF config, tokenizer
    stages/size-0.90/      stage.json (decomposition results), train.jsonl, checkpoint/

Resume: running the same command again skips finished members whose files verify, rebuilds a
damaged one (the same recipe from the same start gives the same member), and continues an
interrupted stage from its last checkpoint, or restarts it if that checkpoint is damaged.

Under ``torchrun --nproc_per_node N -m plrd family`` the same code runs data-parallel
(``plrd.family.distributed``): sharded calibration with summed Grams, DDP (or FSDP2) training on
a global batch, sharded evaluation; rank 0 alone writes files and prints, and decisions that
depend on files are rank 0's, broadcast to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from plrd.core.counting import count_parameters, format_params
from plrd.family import distributed
from plrd.family.checks import check_inputs, check_model
from plrd.family.config import FamilyConfig
from plrd.family.evaluate import evaluate_general, evaluate_sharded, throughput_note
from plrd.family.plot import plot_family
from plrd.family.record import (
    PLOT_FILE,
    check_corpus,
    check_recipe,
    corpus_info,
    new_record,
    parent_entry,
    read_record,
    write_record,
)
from plrd.family.run_data import RunData, assemble, text_corpus
from plrd.family.stage import FamilyRun, Previous, run_stage
from plrd.io.atomic import remove_stale_temporaries
from plrd.io.models import load_model, load_tokenizer


def _say(msg: str) -> None:
    print(msg, flush=True)


def _silent(msg: str) -> None:
    pass


def build_family(
    cfg: FamilyConfig,
    on_step: Callable[[int], None] | None = None,
    say: Callable[[str], None] = _say,
) -> dict:
    """Build (or resume) the family described by ``cfg``; return its record (family.json)."""
    cfg.validate()
    main = distributed.is_main()  # under torchrun: only rank 0 writes files and prints
    documents, device = check_inputs(cfg, cfg.out if main else None)
    device = distributed.init(device)
    run = open_family(cfg, documents, device, say if main else _silent, on_step)
    previous = Previous()
    for index, size in enumerate(cfg.sizes):
        previous = run_stage(run, index, size, previous)
        distributed.on_main(plot, run.record, run.out, run.say)
    distributed.barrier()
    return run.record


def open_family(
    cfg: FamilyConfig,
    documents: Sequence[str],
    device: torch.device,
    say: Callable[[str], None],
    on_step: Callable[[int], None] | None,
) -> FamilyRun:
    """The parent, the run's data and the family's record (new, or read back to resume)."""
    out = Path(cfg.out)
    # decisions that depend on files are rank 0's, taken before it writes anything
    record = distributed.broadcast(read_record(out) if distributed.is_main() else None)
    if record is not None:
        check_recipe(record, cfg)
    tokenizer = load_tokenizer(cfg.model)
    corpus = text_corpus(cfg, documents, tokenizer)
    parent, _, _ = load_model(cfg.model, device)
    check_model(parent, cfg.model, cfg.sizes, cfg.seq_len)
    for p in parent.parameters():
        p.requires_grad_(False)
    data = assemble(cfg, corpus, parent, tokenizer)
    if record is not None:
        check_corpus(record, cfg, data.corpus.fingerprint)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for d in (out, out / "members", out / "stages"):
            remove_stale_temporaries(d)
    torch.manual_seed(cfg.seed)
    say(f"corpus: {data.corpus.summary()}")
    say(f"general text: {data.general_source} ({data.general.numel():,} tokens)")
    run = FamilyRun(
        cfg=cfg,
        out=out,
        device=device,
        corpus=data.corpus,
        eval_blocks=data.corpus.eval_blocks(cfg.eval_tokens),
        calib_blocks=data.corpus.calibration_blocks(cfg.calib_tokens, seed=cfg.seed),
        general_blocks=data.general,
        tokenizer=tokenizer,
        parent=parent,
        parent_params=count_parameters(parent),
        record=record,
        say=say,
        on_step=on_step,
    )
    if record is None:
        run.record = measure_parent(run, data)
    else:
        run.record["config"]["sizes"] = list(cfg.sizes)
    parent_figures = run.record["parent"]
    say(
        f"parent: held-out ppl {parent_figures['held_out_ppl']:.2f}, general ppl "
        f"{parent_figures['general_ppl']:.2f}"
    )
    return run


def measure_parent(run: FamilyRun, data: RunData) -> dict:
    """The record of a new family: the parent measured on the held-out and general blocks;
    written."""
    cfg = run.cfg
    run.say(f"parent {cfg.model}: {format_params(run.parent_params)} parameters; held-out eval ...")
    ev = evaluate_sharded(run.parent, run.eval_blocks, cfg.eval_batch_size)
    general = evaluate_general(run.parent, run.parent, run.general_blocks, cfg.eval_batch_size)
    world = distributed.world_size()
    record = new_record(
        cfg,
        corpus_info(
            run.corpus, cfg.data, int(run.eval_blocks.numel()), int(run.calib_blocks.numel())
        )
        | {"general": data.general_source, "general_tokens": int(data.general.numel())}
        | ({"self_text": data.self_text} if data.self_text else {}),
        parent_entry(cfg.model, run.parent_params, ev.ppl, ev.tokens_per_s, general.ppl),
        throughput_note(ev, cfg.eval_batch_size, cfg.seq_len, run.device, world),
        {
            "eval_tokens": cfg.eval_tokens,
            "eval_batch_size": cfg.eval_batch_size,
            "threads": ev.threads,
        },
    )
    distributed.on_main(write_record, run.out, record)
    return record


def plot(record: dict, out: Path, say: Callable[[str], None] = _say) -> None:
    """family.png, when matplotlib is installed (the family itself is complete without it)."""
    try:
        plot_family(record, out / PLOT_FILE)
    except ImportError as err:
        say(f"family.png not written ({err}); install matplotlib to get the plot")
