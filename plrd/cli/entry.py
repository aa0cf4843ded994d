"""``main``: parse, run the subcommand, and turn what went wrong into one line and an exit code.

The one map from error to exit code:

- bad command-line syntax, ``InputError`` (bad input, found before any work): one line, 2;
- ``DamagedFileError``, ``TrainingDiverged`` and other ``PlrdError``: one line naming the file
  or the step, 1; an ``OSError`` from the system (disk full, permission denied): one line, 1;
- Ctrl-C: 130, with how to resume;
- anything else is a bug in plrd: its traceback and a line asking to report it, 70.

``--debug`` shows the traceback of any error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from plrd.cli import commands
from plrd.cli.parser import UsageError, build_parser, flag
from plrd.errors import ConfigError, InputError, PlrdError, TrainingDiverged
from plrd.family import distributed

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BUG = 70
EXIT_INTERRUPTED = 130

COMMANDS = {
    "family": commands.run_family,
    "decompose": commands.run_decompose,
    "eval": commands.run_eval,
    "info": commands.run_info,
    "export": commands.run_export,
}


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _dir_after_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``plrd eval --data a.txt DIR``: ``--data`` takes one or more paths, so it also took DIR;
    give the last one back to DIR."""
    if args.command != "eval" or args.dir is not None:
        return
    if args.data and len(args.data) > 1:
        args.dir = args.data.pop()
        return
    parser.error("plrd eval needs DIR, the member, family or model directory to evaluate")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed flags (``UsageError`` on bad syntax); ``progress`` set from the terminal."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _dir_after_data(parser, args)
    args.progress = not args.no_progress and sys.stderr.isatty()
    if not args.progress:  # libraries' own bars (transformers' GGUF loading, lm-eval) too
        os.environ["TQDM_DISABLE"] = "1"
    return args


def message(err: BaseException) -> str:
    """The first line of ``err`` in the command line's terms (options shown as flags)."""
    if isinstance(err, ConfigError):
        text = f"{flag(err.option)}: {err.problem}"
    else:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        text = f"{type(err).__name__}: {text}"
    return text


def report(err: BaseException, command: str, debug: bool, code: int) -> int:
    """Print ``err`` as one line ``plrd COMMAND: error: ...`` (its traceback with --debug).

    Under torchrun, bad input and training faults are the same on every rank: rank 0 alone
    reports them; other failures are reported by the rank that hit them, prefixed with it.
    """
    rank = distributed.rank()
    if rank != 0 and not debug and (code == EXIT_USAGE or isinstance(err, TrainingDiverged)):
        return code
    if debug:
        traceback.print_exc()
    prog = f"plrd {command}"
    text = message(err)
    if not text.startswith(prog):
        text = f"{prog}: error: {text}"
    if rank != 0:
        text = f"[rank {rank}] {text}"
    print(text, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plrd`` console script and ``python -m plrd``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except UsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    command, debug = args.command, args.debug
    clean = False
    try:
        _quiet_transformers()
        COMMANDS[command](args)
        clean = True
        return 0
    except InputError as err:
        return report(err, command, debug, EXIT_USAGE)
    except PlrdError as err:
        return report(err, command, debug, err.exit_code)
    except OSError as err:  # the system failed us: disk full, permission denied, ...
        return report(err, command, debug, EXIT_FAILURE)
    except KeyboardInterrupt:
        if distributed.is_main():
            print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(
            f"plrd {command}: internal error: this is a bug in plrd, not in your input; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_BUG
    finally:
        distributed.shutdown(clean)
