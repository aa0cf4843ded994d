"""The subcommands: ``plrd family``, ``plrd decompose``, ``plrd eval``, ``plrd info``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from plrd.cli.display import describe_family, describe_member, format_table
from plrd.cli.parser import config_from_args
from plrd.core.counting import count_parameters, format_params
from plrd.errors import InputError
from plrd.family import distributed
from plrd.family.checks import check_inputs, check_model
from plrd.family.config import FamilyConfig
from plrd.family.data import build_corpus
from plrd.family.device import resolve_device
from plrd.family.evaluate import evaluate
from plrd.family.record import FAMILY_FILE, read_record, verify_members
from plrd.family.schedule import build_family
from plrd.family.sources import load_documents
from plrd.family.stage import calibrate_and_decompose
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
    tokenizer = load_tokenizer(cfg.model)
    corpus = build_corpus(documents, tokenizer, cfg.seq_len, cfg.held_out_fraction)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_model(cfg.model, device)
    check_model(model, cfg.model, (args.size,), cfg.seq_len)
    before = count_parameters(model)
    started = time.perf_counter()
    calib = corpus.calibration_blocks(cfg.calib_tokens, seed=cfg.seed)
    report = calibrate_and_decompose(
        model, args.size, calib, cfg.method, cfg.allocation, cfg.eval_batch_size, cfg.progress
    )
    print(report)
    entry: dict = {
        "size": args.size,
        "source": cfg.model,
        "source_params": before,
        "params": count_parameters(model),
        "method": cfg.method,
        "allocation": cfg.allocation,
        "calibration_tokens": int(calib.numel()),
        "seconds": 0.0,
    }
    if not args.no_eval:
        ev = evaluate(model, corpus.eval_blocks(cfg.eval_tokens), cfg.eval_batch_size)
        entry |= {"zero_shot_ppl": ev.ppl, "tokens_per_s": ev.tokens_per_s}
    entry["seconds"] = round(time.perf_counter() - started, 1)
    save_member(model, tokenizer, args.out, entry, {"decompose.txt": f"{report}\n"})
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
    recorded_names = ("data", "text_column", "seq_len", "held_out_fraction", "eval_tokens")
    for name in (*recorded_names, "eval_batch_size"):
        if getattr(args, name) is None and recorded.get(name) is not None:
            value = recorded[name]
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    return config_from_args(args)


def _describe_text(data: tuple[str, ...]) -> str:
    return ", ".join(data) if data else "the default corpus (Python's pydoc_data.topics)"


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


def run_eval(args: argparse.Namespace) -> list[dict]:
    """Held-out perplexity and tokens/s of DIR: a family (each member), a member, or a model.

    A family is measured on the text and split recorded in its family.json (checked by the
    corpus fingerprint), so the figures match the family's; ``--data`` and the other corpus
    flags override that.
    """
    root = Path(args.dir)
    record = read_record(root)
    own_text = record is not None and args.data is None
    cfg = _eval_config(args, record)
    cfg.validate()
    device = resolve_device(cfg.device)
    targets = _eval_targets(root, record)
    tokenizer = load_tokenizer(targets[0][1])
    corpus = build_corpus(
        load_documents(cfg.data, cfg.text_column), tokenizer, cfg.seq_len, cfg.held_out_fraction
    )
    fingerprint = (record or {}).get("corpus", {}).get("fingerprint")
    if own_text and fingerprint is not None and fingerprint != corpus.fingerprint:
        raise InputError(
            f"the corpus recorded in {root / FAMILY_FILE} ({_describe_text(cfg.data)}) has "
            "changed since the family was built; pass --data to evaluate on other text"
        )
    blocks = corpus.eval_blocks(cfg.eval_tokens)
    source = "the family's own held-out split" if own_text else "the held-out split"
    print(
        f"evaluating on {source} of {_describe_text(cfg.data)}: {blocks.numel():,} tokens "
        f"in blocks of {cfg.seq_len}, {torch.get_num_threads()} threads"
    )
    rows = []
    for label, path in targets:
        model, _, _ = load_model(path, device)
        ev = evaluate(model, blocks, cfg.eval_batch_size)
        rows.append(
            {
                "model": label,
                "params": count_parameters(model),
                "held_out_ppl": ev.ppl,
                "tokens_per_s": ev.tokens_per_s,
                "threads": ev.threads,
                "eval_tokens": ev.tokens,
            }
        )
        print(
            f"{label}: {format_params(rows[-1]['params'])} parameters, held-out ppl "
            f"{ev.ppl:.2f} on {ev.tokens:,} tokens, {ev.tokens_per_s:.0f} tokens/s "
            f"({ev.threads} threads)"
        )
        del model
    return rows


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
