"""Errors of ``plrd.deploy``: one-line messages that name the directory and the fix.

Local for now; they subclass ``ValueError`` (and ``ImportError`` for a missing extra) so callers
that catch the builtin types keep working when they move into the package's error hierarchy.
"""

from __future__ import annotations

from typing import Any

ONNX_EXTRA_HINT = "pip install 'plrd[onnx]'"


class ExportError(ValueError):
    """The model or directory cannot be exported (not a member/model, not a causal LM, ...)."""


class MissingExtraError(ExportError, ImportError):
    """A package of the ``onnx`` extra (onnx, onnxscript, onnxruntime) is not installed."""


class ValidationError(ExportError):
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
