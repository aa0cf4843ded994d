"""The one-shot subcommands: ``plrd decompose``, ``plrd eval``, ``plrd info``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from plrd.core.counting import count_parameters
from plrd.family.schedule import (
    MANIFEST,
    FamilyConfig,
    check_model,
    format_params,
    format_table,
    resolve_device,
    verify_family,
)
from plrd.io.atomic import read_json
from plrd.io.members import verify_member


def _corpus(args: argparse.Namespace, tokenizer):
    from plrd.family.data import build_corpus, load_documents

    docs = load_documents(args.data)
    return build_corpus(docs, tokenizer, args.seq_len, args.held_out_fraction)


def run_decompose(args: argparse.Namespace) -> dict:
    """Decompose ``--model`` to ``--size`` × its parameters; save a member to ``--out``."""
    from plrd.family.evaluate import evaluate
    from plrd.family.schedule import grams_and_decompose
    from plrd.io.members import save_member
    from plrd.io.models import load_model, load_tokenizer

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    corpus = _corpus(args, tokenizer)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_model(args.model, device)
    check_model(model, args.model, (args.size,), args.seq_len)
    before = count_parameters(model)
    started = time.perf_counter()
    calib = corpus.calibration_blocks(args.calib_tokens, seed=args.seed)
    report = grams_and_decompose(
        model,
        args.size,
        calib,
        args.method,
        args.allocation,
        args.eval_batch_size,
        progress=args.progress,
    )
    print(report)
    entry: dict = {
        "size": args.size,
        "source": args.model,
        "source_params": before,
        "params": count_parameters(model),
        "method": args.method,
        "allocation": args.allocation,
        "calibration_tokens": int(calib.numel()),
        "seconds": 0.0,
    }
    if not args.no_eval:
        ev = evaluate(model, corpus.eval_blocks(args.eval_tokens), args.eval_batch_size)
        entry |= {"zero_shot_ppl": ev.ppl, "tokens_per_s": ev.tokens_per_s}
    entry["seconds"] = round(time.perf_counter() - started, 1)
    save_member(model, tokenizer, args.out, metrics=entry, files={"decompose.txt": f"{report}\n"})
    summary = f"{args.out}: {format_params(before)} -> {format_params(entry['params'])} parameters"
    if "zero_shot_ppl" in entry:
        summary += f", held-out ppl {entry['zero_shot_ppl']:.2f}"
    print(summary)
    return entry


def _eval_settings(args: argparse.Namespace, manifest: dict | None) -> argparse.Namespace:
    """The corpus and split ``plrd eval`` measures on: a family's own recorded settings (the
    text, block size, held-out fraction, tokens and batch it was measured with) unless flags
    override them; FamilyConfig's defaults for anything else."""
    recorded = (manifest or {}).get("config", {})
    evaluation = (manifest or {}).get("evaluation", {})
    defaults = FamilyConfig()
    chosen = argparse.Namespace(**vars(args))
    recorded_data = (manifest or {}).get("corpus", {}).get("data", recorded.get("data"))
    chosen.data = args.data if args.data is not None else recorded_data
    for name in ("seq_len", "held_out_fraction", "eval_tokens", "eval_batch_size"):
        if getattr(args, name) is None:
            value = evaluation.get(name, recorded.get(name, getattr(defaults, name)))
            setattr(chosen, name, value)
    return chosen


def _describe_text(data: list[str] | None) -> str:
    return ", ".join(data) if data else "the default corpus (Python's pydoc_data.topics)"


def _eval_targets(root: Path, args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict]:
    """``([(label, path)], manifest or {})`` for a family, a member or a model directory."""
    if (root / MANIFEST).is_file():
        manifest = read_json(root / MANIFEST)
        targets = [(m["path"], str(root / m["path"])) for m in manifest["members"]]
        if not targets:
            raise ValueError(f"{root}/{MANIFEST} lists no finished member yet")
        verify_family(root, manifest)
        return targets, manifest
    if (root / "plrd.json").is_file():
        verify_member(root)
    return [(args.dir, args.dir)], {}


def run_eval(args: argparse.Namespace) -> list[dict]:
    """Held-out perplexity and tokens/s of DIR: a family (each member), a member, or a model.

    A family is measured on the text and split recorded in its family.json (checked by the
    corpus fingerprint), so the figures match the family's; ``--data`` and the other corpus
    flags override that.
    """
    from plrd.family.evaluate import evaluate
    from plrd.io.models import load_model, load_tokenizer

    device = resolve_device(args.device)
    root = Path(args.dir)
    targets, manifest = _eval_targets(root, args)
    settings = _eval_settings(args, manifest)
    tokenizer = load_tokenizer(targets[0][1])
    corpus = _corpus(settings, tokenizer)
    recorded = manifest.get("corpus", {}).get("fingerprint")
    own_text = bool(manifest) and args.data is None
    if own_text and recorded is not None and recorded != corpus.fingerprint:
        raise ValueError(
            f"the corpus recorded in {root / MANIFEST} ({_describe_text(settings.data)}) has "
            "changed since the family was built; pass --data to evaluate on other text"
        )
    blocks = corpus.eval_blocks(settings.eval_tokens)
    source = "the family's own held-out split" if own_text else "the held-out split"
    print(
        f"evaluating on {source} of {_describe_text(settings.data)}: {blocks.numel():,} tokens "
        f"in blocks of {settings.seq_len}, {torch.get_num_threads()} threads"
    )
    rows = []
    for label, path in targets:
        model, _, _ = load_model(path, device)
        ev = evaluate(model, blocks, settings.eval_batch_size)
        row = {
            "model": label,
            "params": count_parameters(model),
            "held_out_ppl": ev.ppl,
            "tokens_per_s": ev.tokens_per_s,
            "threads": ev.threads,
            "eval_tokens": ev.tokens,
        }
        rows.append(row)
        print(
            f"{label}: {format_params(row['params'])} parameters, held-out ppl {ev.ppl:.2f} "
            f"on {ev.tokens:,} tokens, {ev.tokens_per_s:.0f} tokens/s ({ev.threads} threads)"
        )
        del model
    return rows


def _safetensors_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def run_info(directory: str) -> str:
    """Describe a family directory (its table) or a member directory (ranks and metrics)."""
    root = Path(directory)
    if (root / MANIFEST).is_file():
        manifest = read_json(root / MANIFEST)
        cfg = manifest.get("config", {})
        text = (
            f"family in {root}: parent {manifest['parent']['name']}, "
            f"{len(manifest['members'])} finished of sizes "
            f"{','.join(f'{s:g}' for s in cfg.get('sizes', []))}; objective "
            f"{cfg.get('objective')}, method {cfg.get('method')}, allocation "
            f"{cfg.get('allocation')}, {cfg.get('tokens_per_stage', 0):,} tokens per stage\n\n"
            + format_table(manifest)
        )
        print(text)
        verify_family(root, manifest)
        n = len(manifest["members"])
        print(f"\n{n} member{'s' if n != 1 else ''}: weights verified (SHA-256)")
        return text
    if (root / "plrd.json").is_file():
        from plrd.io.checkpoint import verify_checkpoint

        info = verify_checkpoint(root)
        layers = info["layers"]
        params = info.get("num_parameters") or _safetensors_params(root / "model.safetensors")
        lines = [
            f"member {root}: {format_params(params)} parameters, {len(layers)} factored layers "
            "(weights verified)"
        ]
        if layers:
            fractions = [e["rank"] * (e["in"] + e["out"]) / (e["in"] * e["out"]) for e in layers]
            ranks = [e["rank"] for e in layers]
            lines.append(
                f"ranks {min(ranks)}..{max(ranks)}; factored weights keep "
                f"{min(fractions):.1%}..{max(fractions):.1%} of their dense size"
            )
        if (root / "member.json").is_file():
            metrics = read_json(root / "member.json")
            shown = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
            lines.append(shown)
        lines.append("")
        lines.append("layer                                     out x in     rank")
        for e in layers:
            lines.append(f"{e['name']:<40}  {e['out']:>5} x {e['in']:<5}  {e['rank']:>5}")
        text = "\n".join(lines)
    else:
        raise ValueError(
            f"{directory} holds neither {MANIFEST} (a family) nor plrd.json (a member)"
        )
    print(text)
    return text
