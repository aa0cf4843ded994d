"""The progressive schedule: parent → size s₁ → train → s₂ → train → … , every stage saved.

For each size s (a fraction of the PARENT's parameter count P):
  1. Grams Σ xᵀx of every targeted layer's inputs on calibration blocks of the current model;
  2. ``decompose`` in place to keep = s·P / params(current)  (whitened or plain SVD,
     uniform or global rank allocation);
  3. held-out perplexity (zero-shot);  4. train ``tokens_per_stage`` tokens;
  5. held-out perplexity and forward tokens/s;  6. save the member; the next size starts from it.

Layout of ``out``::

    family.json            recipe, corpus, parent, and one entry per finished member
    family.png             params vs held-out perplexity (zero-shot and trained, parent marked)
    members/size-0.90/     a member: plrd.save weights + plrd.json, HF config, tokenizer
    stages/size-0.90/      stage.json (decomposition results), train.jsonl, checkpoint/

Resume: a member is finished once its entry is in family.json; that entry is written last,
after the member directory is complete (the directory is written under a temporary name and
renamed) and records the SHA-256 of the member's weights. Running the same command again skips
finished members whose files verify (against their plrd.json and family.json's sha256),
rebuilds a damaged one (the same recipe from the same start gives the same member), and
continues an interrupted stage from its last checkpoint, or restarts the stage if that
checkpoint is damaged.

Under ``torchrun --nproc_per_node N -m plrd family`` the same code runs data-parallel
(``plrd.family.distributed``): sharded calibration with summed Grams, DDP (or FSDP2 with
``parallel="fsdp"``) training on a global batch of N × ``batch_size`` blocks, sharded evaluation;
rank 0 alone writes files and prints.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from plrd.family import distributed
from plrd.family.data import Corpus, build_corpus, load_documents
from plrd.family.evaluate import EvalResult, evaluate_sharded
from plrd.family.train import (
    OBJECTIVES,
    PARALLEL,
    TrainConfig,
    checkpoint_dir,
    has_checkpoint,
    train_stage,
    verify_state,
)
from plrd.io.atomic import (
    check_writable_dir,
    read_json,
    remove_stale_temporaries,
    write_json,
    write_text,
)

MANIFEST = "family.json"
PLOT = "family.png"
METHODS = ("whiten", "svd")
ALLOCATIONS = ("uniform", "global")
DEFAULT_SIZES = (0.9, 0.8, 0.7)
DEFAULT_TOKENS_PER_STAGE = 32768  # no-argument run: ~10 min on 2 idle cores (see README)
FORMAT_VERSION = 1

# Settings that must match to resume or extend a family in the same directory.
RECIPE_KEYS = (
    "model",
    "tokens_per_stage",
    "objective",
    "method",
    "allocation",
    "seed",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "calib_tokens",
    "eval_tokens",
    "held_out_fraction",
    "train_embeddings",
)


@dataclass
class FamilyConfig:
    """Everything ``plrd family`` needs; the CLI flags map one to one onto these fields."""

    model: str = "smollm2-135m"
    sizes: tuple[float, ...] = DEFAULT_SIZES
    tokens_per_stage: int = DEFAULT_TOKENS_PER_STAGE
    data: tuple[str, ...] = ()
    out: str = "family"
    objective: str = "lm"
    method: str = "whiten"
    allocation: str = "uniform"
    device: str = "auto"
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.25
    calib_tokens: int = 4096
    eval_tokens: int = 4096
    eval_batch_size: int = 8
    held_out_fraction: float = 0.1
    checkpoint_every: int = 10
    train_embeddings: bool = False
    progress: bool = True
    max_bad_steps: int = 10
    parallel: str = "ddp"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError on settings that cannot work, before any model is loaded."""
        check_sizes(self.sizes)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
        positive = {
            "--tokens-per-stage": self.tokens_per_stage + 1,
            "--seq-len": self.seq_len - 1,
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--calib-tokens": self.calib_tokens,
            "--eval-tokens": self.eval_tokens,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} is too small ({getattr(self, _attr(flag))})")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(
                f"--warmup is a fraction of the stage's steps in [0, 1), got {self.warmup}"
            )
        if self.parallel not in PARALLEL:
            raise ValueError(f"--parallel must be one of {', '.join(PARALLEL)}")
        if self.max_bad_steps < 0:
            raise ValueError(f"--max-bad-steps must be >= 0, got {self.max_bad_steps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2^32), got {self.seed}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"--held-out-fraction must be in (0, 1), got {self.held_out_fraction}")

    def recipe(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in RECIPE_KEYS} | {"data": list(self.data)}

    def train_config(self, stage: int = 0) -> TrainConfig:
        """Training settings of stage ``stage`` (0-based; it continues through the corpus)."""
        return TrainConfig(
            tokens=self.tokens_per_stage,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            warmup=self.warmup,
            objective=self.objective,
            checkpoint_every=self.checkpoint_every,
            train_embeddings=self.train_embeddings,
            stage=stage,
            seed=self.seed,
            progress=self.progress,
            max_bad_steps=self.max_bad_steps,
            parallel=self.parallel,
        )


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def check_sizes(sizes: Sequence[float]) -> None:
    """Sizes must be non-empty, each in (0, 1), strictly decreasing."""
    if not sizes:
        raise ValueError("--sizes needs at least one fraction, e.g. --sizes 0.9,0.8,0.7")
    for s in sizes:
        if not 0.0 < s < 1.0:
            raise ValueError(
                f"--sizes: {s:g} is not in (0, 1); sizes are fractions of the parent's parameters"
            )
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        if not b < a:
            raise ValueError(f"--sizes must strictly decrease, but {b:g} follows {a:g}")


def check_model(
    model: torch.nn.Module, name: str, sizes: Sequence[float] = (), seq_len: int | None = None
) -> None:
    """Refuse a model plrd cannot shrink, before any work: one with no targetable linear layer,
    with NaN/inf weights, too small to reach the smallest of ``sizes`` (fractions of its
    parameters) even at rank 1 in every targeted layer, or whose context is shorter than
    ``seq_len``. Raises ValueError naming the model."""
    from plrd.core.counting import count_parameters
    from plrd.core.kinds import is_lowrank, layer_shape
    from plrd.core.ranks import LayerSpec, min_weight_params
    from plrd.core.targets import find_targets, linear_layers

    try:
        layers = find_targets(model)
    except ValueError:
        found = ", ".join(linear_layers(model)) or "none"
        raise ValueError(
            f"--model {name}: {type(model).__name__} has no linear layer plrd can factor "
            f"(linear layers: {found}; output heads and layers tied to embeddings are kept "
            "dense); pass a model with nn.Linear or Conv1D layers"
        ) from None
    for pname, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"--model {name}: parameter {pname} holds NaN or inf values; the weights are "
                "damaged: restore them or pass another model"
            )
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if seq_len is not None and isinstance(context, int) and seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the context of --model {name} ({context} "
            f"positions); use --seq-len {context} or less"
        )
    if sizes:
        specs = [
            LayerSpec(n, *layer_shape(m), m.rank if is_lowrank(m) else None)
            for n, m in layers.items()
        ]
        total = count_parameters(model)
        smallest = total - sum(s.weight_params for s in specs) + min_weight_params(specs)
        if min(sizes) * total < smallest:
            raise ValueError(
                f"size {min(sizes):g} is out of reach for model {name}: even at rank 1 in "
                f"all {len(specs)} targeted layers it keeps {smallest / total:.3f} of its "
                f"parameters; choose a size above {smallest / total:.3f}"
            )


def size_key(size: float) -> str:
    """Directory name of the member of ``size``: ``size-0.90``."""
    text = f"{size:.4f}".rstrip("0")
    if len(text.split(".")[1]) < 2:
        text = f"{size:.2f}"
    return f"size-{text}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:0)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available on this machine; use cpu or auto"
        )
    return dev


def format_params(n: int) -> str:
    """A parameter count with a unit and one decimal: 134.5M, 206.4K, 1.2B, 950."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_table(manifest: dict) -> str:
    """The family as a text table: one row for the parent, one per finished member."""
    parent = manifest["parent"]
    threads = manifest.get("evaluation", {}).get("threads")
    speed = f"tok/s ({threads} threads)" if threads else "tok/s"
    rows = [
        (
            "member",
            "params",
            "% parent",
            "tokens",
            "zero-shot ppl",
            "held-out ppl",
            speed,
            "seconds",
        )
    ]
    rows.append(
        (
            f"parent ({parent['name']})",
            format_params(parent["params"]),
            "100.0",
            "-",
            "-",
            f"{parent['held_out_ppl']:.2f}",
            f"{parent['tokens_per_s']:.0f}",
            "-",
        )
    )
    for m in manifest["members"]:
        rows.append(
            (
                m["path"],
                format_params(m["params"]),
                f"{100 * m['params'] / parent['params']:.1f}",
                f"{m['tokens']:,}",
                f"{m['zero_shot_ppl']:.2f}",
                f"{m['held_out_ppl']:.2f}",
                f"{m['tokens_per_s']:.0f}",
                f"{m['seconds']:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def throughput_note(
    ev: EvalResult, batch_size: int, seq_len: int, device: torch.device, world: int = 1
) -> str:
    """What ``tokens_per_s`` means in family.json, with the thread count it was measured at."""
    where = f"{ev.threads} CPU threads" if device.type == "cpu" else device.type
    together = f", {world} processes together" if world > 1 else ""
    return (
        f"tokens_per_s: forward tokens per second on one batch of {batch_size} x {seq_len} "
        f"held-out tokens, median of timed passes after a warm-up, on {where}{together}"
    )


def _corpus_info(
    corpus: Corpus, data: Sequence[str], eval_blocks: torch.Tensor, calib_blocks: torch.Tensor
) -> dict:
    return {
        "data": [os.path.abspath(os.path.expanduser(p)) for p in data],
        "fingerprint": corpus.fingerprint,
        "block_size": corpus.block_size,
        "train_documents": corpus.train_docs,
        "train_tokens": corpus.train_tokens,
        "held_out_documents": corpus.held_out_docs,
        "held_out_tokens": corpus.held_out_tokens,
        "eval_tokens": int(eval_blocks.numel()),
        "calibration_tokens": int(calib_blocks.numel()),
    }


def _check_resumable(manifest: dict, cfg: FamilyConfig, corpus: Corpus) -> None:
    old = manifest.get("config", {})
    new = cfg.recipe()
    diff = [k for k in new if k in old and k != "data" and old[k] != new[k]]
    if manifest.get("corpus", {}).get("fingerprint") != corpus.fingerprint:
        diff.append("data (the corpus text changed)")
    if diff:
        raise ValueError(
            f"{cfg.out} holds a family built with other settings ({', '.join(diff)}); "
            "rerun with the same settings to resume, or pass a new --out"
        )
    done = [m["size"] for m in manifest.get("members", [])]
    if list(cfg.sizes[: len(done)]) != done:
        raise ValueError(
            f"{cfg.out} already holds members of sizes {','.join(f'{s:g}' for s in done)}; "
            "--sizes must start with them to resume, or pass a new --out"
        )


def verify_family(root: Path, manifest: dict) -> None:
    """Verify every finished member listed in ``manifest``; ValueError naming the first bad one."""
    from plrd.io.members import verify_member

    problems = []
    for m in manifest.get("members", []):
        try:
            verify_member(root / m["path"], m.get("sha256"))
        except ValueError as err:
            problems.append(f"{m['path']}: {err}")
    if problems:
        more = f" (and {len(problems) - 1} more damaged member(s))" if len(problems) > 1 else ""
        raise ValueError(
            f"{problems[0]}{more}; run the same `plrd family` command again to rebuild "
            "damaged members"
        )


def _record(manifest: dict, entry: dict) -> None:
    """Put ``entry`` into ``manifest["members"]`` (replacing one of the same size), by size."""
    members = [m for m in manifest["members"] if m["size"] != entry["size"]] + [entry]
    manifest["members"] = sorted(members, key=lambda m: -m["size"])


def _say(msg: str) -> None:
    print(msg, flush=True)


def _silent(msg: str) -> None:
    pass


def _resumable(stage_dir: Path) -> str | None:
    """None: no interrupted stage here; "ok": its checkpoint verifies; else what is wrong."""
    from plrd.io.checkpoint import verify_checkpoint

    if not (has_checkpoint(stage_dir) and (stage_dir / "stage.json").is_file()):
        return None
    try:
        read_json(stage_dir / "stage.json")
        verify_state(checkpoint_dir(stage_dir))
        verify_checkpoint(checkpoint_dir(stage_dir))
    except ValueError as err:  # JSONDecodeError included
        return str(err).splitlines()[0]
    return "ok"


def grams_and_decompose(
    model: torch.nn.Module,
    keep: float,
    calib: torch.Tensor,
    method: str = "whiten",
    allocation: str = "uniform",
    batch_size: int = 8,
    progress: bool = True,
) -> Any:
    """Grams on ``calib`` blocks [N, T] (whiten only), then ``plrd.decompose`` in place.

    Data parallel: each rank collects Grams on its shard of ``calib`` and they are summed over
    the ranks (all ranks use all blocks when there are fewer blocks than ranks), so every rank
    decomposes identically; the resulting ranks are checked to agree.
    """
    from plrd.core.calibrate import collect_grams
    from plrd.core.surgery import decompose

    grams = None
    if method == "whiten":
        split = distributed.world_size() > 1 and len(calib) >= distributed.world_size()
        mine = distributed.shard(calib) if split else calib
        grams = collect_grams(model, mine.split(batch_size), progress=progress)
        if split:
            distributed.all_reduce_grams(grams)
    report = decompose(
        model, keep, grams=grams, allocation=allocation, method=method, progress=progress
    )
    ranks = [(row.name, row.rank_after) for row in report.layers]
    distributed.same_on_all_ranks(ranks, "the decomposition's ranks")
    return report


def _plot(manifest: dict, out: Path) -> None:
    try:
        from plrd.family.plot import plot_family

        plot_family(manifest, out / PLOT)
    except ImportError as err:  # matplotlib missing: the family itself is complete
        _say(f"family.png not written ({err}); install matplotlib to get the plot")


def build_family(
    cfg: FamilyConfig,
    on_step: Callable[[int], None] | None = None,
    say: Callable[[str], None] = _say,
) -> dict:
    """Build (or resume) the family described by ``cfg``; return the manifest (family.json)."""
    from plrd.core.counting import count_parameters
    from plrd.io.hf import empty_model
    from plrd.io.members import load_pretrained, save_member, verify_member
    from plrd.io.models import load_model, load_tokenizer

    cfg.validate()
    out = Path(cfg.out)
    main = distributed.is_main()  # under torchrun: only rank 0 writes files and prints
    if not main:
        say = _silent
    device = distributed.init(resolve_device(cfg.device))
    world = distributed.world_size()
    if main:
        check_writable_dir(out)
    documents = load_documents(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    corpus = build_corpus(documents, tokenizer, cfg.seq_len, cfg.held_out_fraction)
    manifest_path = out / MANIFEST
    # decisions that depend on files are rank 0's, taken before it writes anything
    manifest = distributed.broadcast(read_json(manifest_path) if manifest_path.is_file() else None)
    if manifest is not None:
        _check_resumable(manifest, cfg, corpus)
    parent, _, _ = load_model(cfg.model, device)
    check_model(parent, cfg.model, cfg.sizes, cfg.seq_len)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for d in (out, out / "members", out / "stages"):
            remove_stale_temporaries(d)

    torch.manual_seed(cfg.seed)
    eval_blocks = corpus.eval_blocks(cfg.eval_tokens)
    calib_blocks = corpus.calibration_blocks(cfg.calib_tokens, seed=cfg.seed)
    say(f"corpus: {corpus.summary()}")
    for p in parent.parameters():
        p.requires_grad_(False)
    parent_params = count_parameters(parent)

    if manifest is None:
        say(f"parent {cfg.model}: {format_params(parent_params)} parameters; held-out eval ...")
        ev = evaluate_sharded(parent, eval_blocks, cfg.eval_batch_size)
        manifest = {
            "format": FORMAT_VERSION,
            "config": cfg.recipe() | {"sizes": list(cfg.sizes)},
            "corpus": _corpus_info(corpus, cfg.data, eval_blocks, calib_blocks),
            "throughput": throughput_note(ev, cfg.eval_batch_size, cfg.seq_len, device, world),
            "evaluation": {
                "eval_tokens": cfg.eval_tokens,
                "eval_batch_size": cfg.eval_batch_size,
                "threads": ev.threads,
            },
            "parent": {
                "name": cfg.model,
                "params": parent_params,
                "held_out_ppl": ev.ppl,
                "tokens_per_s": ev.tokens_per_s,
            },
            "members": [],
        }
        distributed.on_main(write_json, manifest_path, manifest)
    else:
        manifest["config"]["sizes"] = list(cfg.sizes)
    say(f"parent: held-out ppl {manifest['parent']['held_out_ppl']:.2f}")

    teacher = parent if cfg.objective != "lm" else None
    done = {m["size"]: m for m in manifest["members"]}
    previous_dir: Path | None = None
    current: torch.nn.Module | None = None
    for stage_index, size in enumerate(cfg.sizes):
        rel = f"members/{size_key(size)}"
        member_dir = out / rel
        stage_dir = out / "stages" / size_key(size)
        known = done.get(size)
        check = None
        if main and (known is not None or (member_dir / "member.json").is_file()):
            # finished earlier (or saved just before its family.json entry): trusted only if
            # its files check out; a damaged member is rebuilt, replacing it atomically
            try:
                digest, problem = verify_member(member_dir, (known or {}).get("sha256")), None
            except ValueError as err:
                digest, problem = None, str(err)
            saved = known or (read_json(member_dir / "member.json") if problem is None else None)
            check = (digest, problem, saved)
        check = distributed.broadcast(check)
        if check is not None:
            digest, problem, saved = check
            if problem is None:
                if known is None or known.get("sha256") != digest:
                    _record(manifest, {**saved, "sha256": digest})
                    distributed.on_main(write_json, manifest_path, manifest)
                    say(f"{rel}: finished earlier, recorded")
                else:
                    say(f"{rel}: finished earlier, skipped (weights verified)")
                previous_dir, current = member_dir, None
                continue
            say(f"{rel}: finished earlier but damaged ({problem}); rebuilding it")

        started = time.perf_counter()
        stage_file = stage_dir / "stage.json"
        model = None
        resume = distributed.broadcast(_resumable(stage_dir) if main else None)
        if resume is not None and resume != "ok":
            say(
                f"{rel}: the interrupted stage's checkpoint is damaged ({resume}); starting the "
                "stage again"
            )
        if resume == "ok":
            from plrd.io.checkpoint import load

            stage = read_json(stage_file)
            model = load(checkpoint_dir(stage_dir), empty_model(parent.config)).to(device)
            say(f"{rel}: resuming the interrupted stage from its last checkpoint")
        distributed.barrier()  # every rank has read the checkpoint before rank 0 changes files
        if model is None:
            if current is not None:
                model = current
            elif previous_dir is not None:
                model = load_pretrained(previous_dir, device)
            else:
                model = copy.deepcopy(parent)
            for p in model.parameters():
                p.requires_grad_(True)
            params_now = count_parameters(model)
            keep = size * parent_params / params_now
            say(
                f"{rel}: decomposing {format_params(params_now)} -> "
                f"{format_params(int(size * parent_params))} (keep {keep:.3f}, {cfg.method}, "
                f"{cfg.allocation})"
            )
            if main:
                if stage_dir.exists():
                    shutil.rmtree(stage_dir)
                stage_dir.mkdir(parents=True)
            distributed.barrier()
            report = grams_and_decompose(
                model,
                keep,
                calib_blocks,
                cfg.method,
                cfg.allocation,
                cfg.eval_batch_size,
                cfg.progress and main,
            )
            distributed.on_main(write_text, stage_dir / "decompose.txt", f"{report}\n")
            zero = evaluate_sharded(model, eval_blocks, cfg.eval_batch_size, timing_repeats=0)
            stage = {
                "size": size,
                "keep": keep,
                "params": count_parameters(model),
                "zero_shot_ppl": zero.ppl,
                "prep_seconds": time.perf_counter() - started,
            }
            distributed.on_main(write_json, stage_file, stage)
            say(f"{rel}: {format_params(stage['params'])} parameters, zero-shot ppl {zero.ppl:.2f}")
        for p in model.parameters():
            p.requires_grad_(True)
        result = train_stage(
            model,
            corpus.train,
            cfg.train_config(stage_index),
            stage_dir,
            teacher,
            on_step,
            desc=rel,
        )
        post_start = time.perf_counter()
        trained: EvalResult = evaluate_sharded(model, eval_blocks, cfg.eval_batch_size)
        entry = {
            "size": size,
            "params": count_parameters(model),
            "path": rel,
            "tokens": result.tokens,
            "zero_shot_ppl": stage["zero_shot_ppl"],
            "held_out_ppl": trained.ppl,
            "tokens_per_s": trained.tokens_per_s,
            "seconds": 0.0,
            "train_seconds": result.seconds,
            "keep": stage["keep"],
            "final_train_loss": result.final_loss,
            "skipped_steps": result.skipped_steps,
            "world_size": world,
        }
        entry["seconds"] = round(
            stage["prep_seconds"] + result.seconds + (time.perf_counter() - post_start), 1
        )
        saved = None
        if main:
            extra_files = {}
            if (stage_dir / "decompose.txt").is_file():
                extra_files["decompose.txt"] = (stage_dir / "decompose.txt").read_text()
            save_member(model, tokenizer, member_dir, metrics=entry, files=extra_files)
            try:
                saved = verify_member(member_dir), None
            except ValueError as err:
                saved = None, str(err)
        entry["sha256"], problem = distributed.broadcast(saved)
        if problem is not None:
            raise ValueError(f"{rel} was saved but does not read back: {problem}")
        _record(manifest, entry)
        if main:
            write_json(manifest_path, manifest)  # the member is finished from here on
            shutil.rmtree(checkpoint_dir(stage_dir), ignore_errors=True)
        say(
            f"{rel}: held-out ppl {stage['zero_shot_ppl']:.2f} -> {trained.ppl:.2f} after "
            f"{result.tokens:,} tokens; {trained.tokens_per_s:.0f} tok/s"
        )
        distributed.on_main(_plot, manifest, out)
        previous_dir, current = member_dir, model

    distributed.on_main(_plot, manifest, out)
    distributed.barrier()
    return manifest
