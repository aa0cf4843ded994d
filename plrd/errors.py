"""The errors plrd raises on purpose, by kind.

Every one is a ``PlrdError``, itself a ``ValueError`` (callers that caught ``ValueError`` keep
working). The kind says whose move it is, and the ``plrd`` command turns it into an exit code
in one place (``plrd.cli.entry``):

- ``InputError`` (exit 2): the input cannot work — an argument, a setting, a data file, a model
  — and nothing was done. ``ConfigError`` is the kind that names one option of a config.
- ``DamagedFileError`` (exit 1): a file plrd wrote or reads is missing, damaged, or does not
  match what it should hold (a checksum, the model it is loaded into); the message names it.
- ``TrainingDiverged`` (exit 1): training stopped on non-finite values; the message names the
  step and the checkpoint that was kept.

Anything else escaping plrd is a bug in plrd, and the command reports it as one.
"""

from __future__ import annotations


class PlrdError(ValueError):
    """Base of the errors plrd raises on purpose; ``exit_code`` is what the command returns."""

    exit_code = 1


class InputError(PlrdError):
    """Bad input or settings, found before any work was done (exit 2)."""

    exit_code = 2


class ConfigError(InputError):
    """A setting of a config that cannot work: ``option`` is the field's name, ``problem`` what
    is wrong with it and how to fix it. The command line shows the option as its flag."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option
        self.problem = problem


class DamagedFileError(PlrdError):
    """A file is missing, damaged or does not match what it should hold (exit 1)."""


class TrainingDiverged(PlrdError):
    """Training stopped on non-finite losses, gradients or weights (exit 1); the message names
    the step and the checkpoint that was kept."""
