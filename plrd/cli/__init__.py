"""The ``plrd`` command: the parser, the subcommands, what is printed, exit codes."""

from plrd.cli.entry import main

__all__ = ["main"]
