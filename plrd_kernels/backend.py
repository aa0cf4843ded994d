"""Choice of backend for ``lowrank_linear``: env ``PLRD_BACKEND`` = auto | triton | torch."""

from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "torch")


def requested_backend() -> str:
    """The backend named by ``PLRD_BACKEND`` (default ``auto``), validated."""
    name = os.environ.get("PLRD_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"PLRD_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}"
        )
    return name
