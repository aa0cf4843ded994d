"""The subcommands: ``plrd family``, ``plrd decompose``, ``plrd eval``, ``plrd info``."""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

import torch

from plrd.cli.display import describe_family, describe_member, format_table
from plrd.cli.parser import config_from_args
from plrd.core.counting import count_parameters, format_params
from plrd.deploy.onnx_export import export_onnx
from plrd.errors import InputError
from plrd.family import distributed
from plrd.family.card import CARD_FILE, member_card
from plrd.family.checks import check_inputs, check_model
from plrd.family.config import FamilyConfig
from plrd.family.device import resolve_device
from plrd.family.evaluate import evaluate, evaluate_general
from plrd.family.record import FAMILY_FILE, read_record, verify_members, write_record
from plrd.family.run_data import RunData, assemble, read_text_documents, text_corpus, uses_self
from plrd.family.schedule import build_family
from plrd.family.stage import calibrate_and_decompose
from plrd.family.tasks import primary_metric, score, task_manager
from plrd.io.atomic import read_json
from plrd.io.checkpoint import verify_checkpoint
from plrd.io.info import INFO_FILE, WEIGHTS_FILE
from plrd.io.integrity import read_safetensors_header
from plrd.io.members import MEMBER_FILE, is_member_dir, save_member, verify_member
from plrd.io.models import load_model, load_tokenizer


def run_family(args: argparse.Namespace) -> dict:
    """Build (or resume) the family the flags describe and print its table."""
    cfg = config_from_args(args)
    record = build_family(cfg)
    if distributed.is_main():
        print()
        print(format_table(record))
        print(f"\nfamily: {cfg.out}/{FAMILY_FILE}, plot: {cfg.out}/family.png")
    return record


def run_decompose(args: argparse.Namespace) -> dict:
    """Decompose ``--model`` to ``--size`` × its parameters; save a member to ``--out``."""
    cfg = config_from_args(args)
    cfg.validate()
    documents, device = check_inputs(cfg, args.out)
    corpus = text_corpus(cfg, documents, load_tokenizer(cfg.model))
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_model(cfg.model, device)
    check_model(model, cfg.model, (args.size,), cfg.seq_len)
    if uses_self(cfg.data):  # text written by the model itself, before it is cut
        corpus = assemble(cfg, corpus, model, tokenizer).corpus
    before = count_parameters(model)
    started = time.perf_counter()
    calib = corpus.calibration_blocks(cfg.calib_tokens, seed=cfg.seed)
    report = calibrate_and_decompose(
        model,
        args.size,
        calib,
        cfg.method,
        cfg.allocation,
        cfg.eval_batch_size,
        cfg.progress,
        cfg.min_saving,
        cfg.calibration,
    )
    print(report)
    entry: dict = {
        "size": args.size,
        "source": cfg.model,
        "source_params": before,
        "params": count_parameters(model),
        "method": cfg.method,
        "allocation": cfg.allocation,
        "min_saving": cfg.min_saving,
        "calibration": cfg.calibration,
        "calibration_tokens": int(calib.numel()),
        "seconds": 0.0,
    }
    if not args.no_eval:
        ev = evaluate(model, corpus.eval_blocks(cfg.eval_tokens), cfg.eval_batch_size)
        entry |= {"zero_shot_ppl": ev.ppl, "tokens_per_s": ev.tokens_per_s}
    entry["seconds"] = round(time.perf_counter() - started, 1)
    card = member_card(model, cfg.model, before, entry, cfg.recipe())
    save_member(
        model, tokenizer, args.out, entry, {"decompose.txt": f"{report}\n", CARD_FILE: card}
    )
    summary = f"{args.out}: {format_params(before)} -> {format_params(entry['params'])} parameters"
    if "zero_shot_ppl" in entry:
        summary += f", held-out ppl {entry['zero_shot_ppl']:.2f}"
    print(summary)
    return entry


def _eval_config(args: argparse.Namespace, record: dict | None) -> FamilyConfig:
    """The corpus and split ``plrd eval`` measures on: a family's own recorded settings (the
    text, block size, held-out fraction, tokens and batch it was measured with) unless flags
    override them; the defaults for anything else."""
    recorded = dict((record or {}).get("config", {}))
    recorded |= (record or {}).get("evaluation", {})
    if record is not None:
        recorded["data"] = record.get("corpus", {}).get("data", recorded.get("data"))
    recorded_names = ("data", "eval_data", "self_tokens", "seed", "text_column", "seq_len")
    recorded_names += ("held_out_fraction", "eval_tokens")
    for name in (*recorded_names, "eval_batch_size"):
        if getattr(args, name, None) is None and recorded.get(name) is not None:
            value = recorded[name]
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    return config_from_args(args)


def _describe_text(data: tuple[str, ...]) -> str:
    return ", ".join(data) if data else "pydoc (Python's pydoc_data.topics help pages)"


def _eval_targets(root: Path, record: dict | None) -> list[tuple[str, str]]:
    """``[(label, path)]`` of what to evaluate in a family, a member or a model directory; the
    members' files are verified first."""
    if record is not None:
        targets = [(m["path"], str(root / m["path"])) for m in record["members"]]
        if not targets:
            raise InputError(f"{root / FAMILY_FILE} lists no finished member yet")
        verify_members(root, record)
        return targets
    if is_member_dir(root):
        verify_member(root)
    return [(str(root), str(root))]


def _parent_of(root: Path, record: dict | None) -> str | None:
    """The model a family or a decomposed member was made from, when it is known."""
    if record is not None:
        return record["parent"]["name"]
    metrics = root / MEMBER_FILE
    return read_json(metrics).get("source") if metrics.is_file() else None


def _eval_data(cfg: FamilyConfig, root: Path, record: dict | None, tokenizer, device):
    """The held-out and general blocks, assembled as the family run does (the parent's own
    text from the cache, the same splits), and the parent (None when unknown)."""
    name = _parent_of(root, record)
    parent = load_model(name, device)[0] if name is not None else None
    corpus = text_corpus(cfg, read_text_documents(cfg), tokenizer)
    if parent is None:
        if corpus is None:
            raise InputError(f"{root}: its parent is unknown, so --data self cannot be made")
        return RunData(corpus=corpus, general=None, general_source="none"), None
    for p in parent.parameters():
        p.requires_grad_(False)
    return assemble(cfg, corpus, parent, tokenizer, train_text=False), parent


def run_eval(args: argparse.Namespace) -> list[dict]:
    """Held-out perplexity, general perplexity and KL to the parent (when the parent is known)
    and tokens/s of DIR: a family (each member), a member, or a model.

    A family is measured on the text and splits recorded in its family.json (checked by the
    corpus fingerprint), so the figures match the family's; ``--data``, ``--eval-data`` and the
    other corpus flags override that.
    """
    root = Path(args.dir)
    record = read_record(root)
    own_text = record is not None and args.data is None
    cfg = _eval_config(args, record)
    cfg.validate()
    device = resolve_device(cfg.device)
    manager = task_manager(args.tasks, args.tasks_path) if args.tasks else None
    targets = _eval_targets(root, record)
    tokenizer = load_tokenizer(targets[0][1])
    data, parent = _eval_data(cfg, root, record, tokenizer, device)
    fingerprint = (record or {}).get("corpus", {}).get("fingerprint")
    if own_text and fingerprint is not None and fingerprint != data.corpus.fingerprint:
        raise InputError(
            f"the corpus recorded in {root / FAMILY_FILE} ({_describe_text(cfg.data)}) has "
            "changed since the family was built; pass --data to evaluate on other text"
        )
    blocks = data.corpus.eval_blocks(cfg.eval_tokens)
    source = "the family's own held-out split" if own_text else "the held-out split"
    print(
        f"evaluating on {source} of {_describe_text(cfg.data)}: {blocks.numel():,} tokens "
        f"in blocks of {cfg.seq_len}, {torch.get_num_threads()} threads"
        + (f"; general text: {data.general_source}" if parent is not None else "")
    )
    measure = partial(_measure, blocks=blocks, data=data, parent=parent, cfg=cfg, args=args)
    parent_row = None
    if parent is not None:
        parent_row = measure("parent", parent, tokenizer, manager=manager, reference=None)
    rows = [
        measure(label, *load_model(path, device)[:2], manager=manager, reference=parent_row)
        for label, path in targets
    ]
    if manager is not None:
        _record_tasks(root, record, rows, parent_row)
    return ([parent_row] if parent_row else []) + rows


def _record_tasks(root: Path, record: dict | None, rows: list[dict], parent_row) -> None:
    """The task scores of the parent and members written into family.json, then the table."""
    if record is None:
        return
    if parent_row is not None:
        record["parent"]["tasks"] = parent_row["tasks"]
    by_path = {row["model"]: row for row in rows}
    for member in record["members"]:
        if member["path"] in by_path:
            member["tasks"] = {**member.get("tasks", {}), **by_path[member["path"]]["tasks"]}
    write_record(root, record)
    print()
    print(format_table(record))


def _task_line(tasks: dict[str, dict[str, float]]) -> str:
    shown = []
    for task, metrics in tasks.items():
        head = primary_metric(metrics)
        if head is not None:
            shown.append(f"{task} {head[0]} {head[1]:.3f}")
    return ", ".join(shown)


def _measure(
    label,
    model,
    tokenizer,
    *,
    blocks,
    data: RunData,
    parent,
    cfg: FamilyConfig,
    args,
    manager,
    reference: dict | None,
) -> dict:
    """One printed line and row for ``model``: held-out ppl and tokens/s, general ppl and KL
    to the parent (with the ratio to the parent's general ppl, ``reference``), task scores."""
    ev = evaluate(model, blocks, cfg.eval_batch_size)
    row = {
        "model": label,
        "params": count_parameters(model),
        "held_out_ppl": ev.ppl,
        "tokens_per_s": ev.tokens_per_s,
        "threads": ev.threads,
        "eval_tokens": ev.tokens,
    }
    general = ""
    if parent is not None:
        g = evaluate_general(model, parent, data.general, cfg.eval_batch_size)
        row |= {"general_ppl": g.ppl, "kl_to_parent": g.kl_to_parent}
        ratio = f" ({g.ppl / reference['general_ppl']:.2f}x parent)" if reference else ""
        general = f", general ppl {g.ppl:.2f}{ratio}, KL to parent {g.kl_to_parent:.3f}"
    if manager is not None:
        row["tasks"] = score(
            model, tokenizer, args.tasks, manager, cfg.eval_batch_size, args.tasks_limit
        )
        general += f"; {_task_line(row['tasks'])}"
    print(
        f"{label}: {format_params(row['params'])} parameters, held-out ppl {ev.ppl:.2f} on "
        f"{ev.tokens:,} tokens{general}, {ev.tokens_per_s:.0f} tokens/s ({ev.threads} threads)"
    )
    return row


def run_export(args: argparse.Namespace) -> object:
    """Export DIR to ONNX and validate it in ONNX Runtime; print the report."""
    report = export_onnx(
        args.dir,
        args.out,
        opset=args.opset,
        validate_prompts=args.prompt,
        validate=not args.no_validate,
        max_new_tokens=args.new_tokens,
        overwrite=args.overwrite,
    )
    print(report)
    return report


def _stored_params(root: Path) -> int:
    """Parameters in the member's weights file (plrd.json of format 1 does not record them)."""
    header = read_safetensors_header(root / WEIGHTS_FILE)
    return sum(math.prod(shape) for _, shape in header.values())


def run_info(args: argparse.Namespace) -> str:
    """Describe a family directory (its table) or a member directory (ranks and metrics)."""
    root = Path(args.dir)
    record = read_record(root)
    if record is not None:
        text = describe_family(str(root), record)
        print(text)
        verify_members(root, record)
        n = len(record["members"])
        print(f"\n{n} member{'s' if n != 1 else ''}: weights verified (SHA-256)")
        return text
    if not is_member_dir(root):
        raise InputError(
            f"{root} holds neither {FAMILY_FILE} (a family) nor {INFO_FILE} (a member)"
        )
    info = verify_checkpoint(root)
    metrics = read_json(root / MEMBER_FILE) if (root / MEMBER_FILE).is_file() else None
    params = info.get("num_parameters") or _stored_params(root)
    text = describe_member(str(root), info, params, metrics)
    print(text)
    return text
