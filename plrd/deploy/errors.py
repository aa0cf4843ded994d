"""Errors of ``plrd.deploy``, kinds of ``plrd.errors``: one-line messages that name the directory
and the fix. A directory that cannot be exported and a missing extra are bad input (exit 2); an
export that disagrees with PyTorch is a failure of the export (exit 1)."""

from __future__ import annotations

from typing import Any

from plrd.errors import InputError, PlrdError

ONNX_EXTRA_HINT = "pip install 'plrd[onnx]'"


class ExportError(InputError):
    """The model or directory cannot be exported (not a member/model, not a causal LM, ...)."""


class MissingExtraError(ExportError, ImportError):
    """A package of the ``onnx`` extra (onnx, onnxscript, onnxruntime) is not installed."""


class ValidationError(PlrdError):
    """The exported model disagrees with PyTorch beyond the tolerance; ``report`` has figures."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


def require_onnx_extra(*modules: str) -> None:
    """Import ``modules`` (default: onnx, onnxscript, onnxruntime) or raise MissingExtraError."""
    import importlib

    for name in modules or ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise MissingExtraError(
                f"ONNX export/runtime needs the '{name}' package, which is not importable "
                f"({error}); install the extra with: {ONNX_EXTRA_HINT}"
            ) from error
