"""The ``plrd`` argument parser, generated from the option declarations of ``FamilyConfig``.

An option's flag is its name with dashes (``tokens_per_stage`` → ``--tokens-per-stage``); its
help, default, choices and parser come from its declaration, and only the subcommands listed
in its ``commands`` take it. The few flags that belong to one subcommand alone (``decompose
--size``, ``eval DIR``) and to the command line alone (``--no-progress``, ``--debug``) are
declared here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from plrd.family import options
from plrd.family.config import FamilyConfig
from plrd.family.options import parse_count, parse_number


class UsageError(Exception):
    """Bad command-line syntax: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def flag(name: str) -> str:
    """The command-line flag of option ``name``: ``tokens_per_stage`` → ``--tokens-per-stage``."""
    return "--" + name.replace("_", "-")


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def add_options(parser: argparse.ArgumentParser, command: str, unset: bool = False) -> None:
    """The flags of every option ``command`` takes; with ``unset`` their defaults are None (the
    caller fills them from elsewhere, e.g. a family's record)."""
    for opt in options.declared(FamilyConfig):
        meta = opt.meta
        if command not in meta.commands:
            continue
        if isinstance(opt.default, bool):
            parser.add_argument(flag(opt.name), action="store_true", help=meta.help)
            continue
        default = meta.show_default if meta.show_default is not None else opt.default
        kwargs: dict[str, Any] = {"help": meta.help, "default": None if unset else default}
        if default == () or unset:
            kwargs["default"] = None
        if meta.parse is not None:
            kwargs["type"] = _argparse_type(meta.parse)
        if meta.choices is not None:
            kwargs["choices"] = meta.choices
        if meta.metavar is not None:
            kwargs["metavar"] = meta.metavar
        if meta.many:
            kwargs["nargs"] = "+"
        parser.add_argument(flag(opt.name), **kwargs)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are shown only when stderr is a terminal)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(" ", "").split(",") if n)
    if not names:
        raise ValueError("give at least one task name, e.g. boolq,winogrande")
    return names


def _positive(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise ValueError(f"{value} must be >= 1")
    return value


def _fraction(text: str) -> float:
    value = parse_number(text)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{value:g} is not in (0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``plrd`` parser: one subparser per command."""
    parser = Parser(
        prog="plrd",
        description="Progressive Low-Rank Decomposition: one pretrained model in, a family of "
        "smaller models out.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_family, _add_decompose, _add_eval, _add_export, _add_info):
        add(sub)
    return parser


def _add_family(sub: Any) -> None:
    fam = sub.add_parser(
        "family",
        formatter_class=Formatter,
        help="build a family: decompose, train, save at each size",
        description=(
            "Build a family of smaller models from --model: for each size, decompose the "
            "current model to size x parent parameters, train --tokens-per-stage tokens, save "
            "the member; the next size starts from it.\nRun the same command again to resume."
        ),
    )
    add_options(fam, "family")
    add_output_flags(fam)


def _add_decompose(sub: Any) -> None:
    dec = sub.add_parser(
        "decompose",
        formatter_class=Formatter,
        help="decompose a model once and save it as a member (no training)",
        description="Decompose --model to --size x its parameters and save the result to --out "
        "(a member directory that plrd.load_pretrained reads).",
    )
    dec.add_argument(
        "--size",
        type=_argparse_type(_fraction),
        required=True,
        help="fraction of the model's parameters to keep, in (0, 1)",
    )
    dec.add_argument("--out", required=True, help="member directory to write")
    dec.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity")
    add_options(dec, "decompose")
    add_output_flags(dec)


def _add_eval(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        formatter_class=Formatter,
        help="held-out perplexity and tokens/s of a member, a family or a model",
        description="Evaluate DIR (a member directory, a family directory, a Hugging Face "
        "directory or smollm2-135m). A family is measured on its own recorded corpus and "
        "split unless --data (or another corpus flag) is given.",
    )
    ev.add_argument("dir", metavar="DIR", nargs="?")
    ev.add_argument(
        "--tasks",
        type=_argparse_type(_names),
        metavar="NAME,...",
        help="lm-eval task names (boolq, winogrande, logiqa, mmlu, ... or your own) scored on "
        "the parent and every member; written to family.json (needs pip install 'plrd[eval]')",
    )
    ev.add_argument(
        "--tasks-path",
        nargs="+",
        metavar="DIR",
        default=(),
        help="folders of your own lm-eval task YAMLs",
    )
    ev.add_argument(
        "--tasks-limit",
        type=_argparse_type(_positive),
        metavar="N",
        help="score only the first N documents of each task (a quick look, not a result)",
    )
    add_options(ev, "eval", unset=True)
    add_output_flags(ev)


def _add_export(sub: Any) -> None:
    exp = sub.add_parser(
        "export",
        formatter_class=Formatter,
        help="export a member (or a dense model) to ONNX with KV cache, validated in ONNX Runtime",
        description="Export DIR (a member directory or a Hugging Face model directory) to --out "
        "as an ONNX causal LM with past/present key values, the factored layers kept as two "
        "MatMuls, plus config and tokenizer; then run it in ONNX Runtime against PyTorch on a "
        "few prompts and report the largest logit difference (needs pip install 'plrd[onnx]').",
    )
    exp.add_argument("dir", metavar="DIR")
    exp.add_argument("--out", required=True, help="output directory (must be empty)")
    exp.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    exp.add_argument(
        "--opset", type=_argparse_type(_positive), help="ONNX opset (default: the exporter's)"
    )
    exp.add_argument(
        "--prompt", action="append", help="validation prompt (repeatable; default: three)"
    )
    exp.add_argument(
        "--new-tokens", type=_argparse_type(_positive), default=20, help="greedy tokens compared"
    )
    exp.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_output_flags(exp)


def _add_info(sub: Any) -> None:
    info = sub.add_parser(
        "info",
        formatter_class=Formatter,
        help="describe a family or a member directory",
        description="Print the family table of a family directory, or the ranks and metrics of "
        "a member directory.",
    )
    info.add_argument("dir", metavar="DIR")
    add_output_flags(info)


def config_from_args(args: argparse.Namespace) -> FamilyConfig:
    """A FamilyConfig from parsed flags: given values, defaults for the rest."""
    values = {
        opt.name: getattr(args, opt.name)
        for opt in options.declared(FamilyConfig)
        if getattr(args, opt.name, None) is not None
    }
    if "data" in values:
        values["data"] = tuple(values["data"])
    config = options.from_values(FamilyConfig, values)
    config.progress = args.progress
    return config


PIPE = " \\| "  # a "|" inside a Markdown table cell


def flag_table(command: str = "family") -> str:
    """The flags of ``command`` as a Markdown table (the README's table is this text)."""
    rows = ["| flag | default | what it sets |", "| --- | --- | --- |"]
    for opt in options.declared(FamilyConfig):
        if command not in opt.meta.commands:
            continue
        default = opt.meta.show_default or opt.default
        if isinstance(default, tuple):
            default = " ".join(map(str, default))
        shown = "—" if default in ("", None) else f"`{default}`"
        choices = f" ({PIPE.join(opt.meta.choices)})" if opt.meta.choices else ""
        rows.append(f"| `{flag(opt.name)}` | {shown} | {opt.meta.help}{choices} |")
    return "\n".join(rows)
