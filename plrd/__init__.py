"""plrd: Progressive Low-Rank Decomposition of pretrained PyTorch models into model families.

Public names are imported lazily so that ``import plrd`` stays light (transformers is touched
only where a Hugging Face model is).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LowRankLinear": "plrd.core.layer",
    "decompose": "plrd.core.surgery",
    "plan_decomposition": "plrd.core.surgery",
    "decompose_sequentially": "plrd.core.sequential",
    "DecompositionReport": "plrd.core.surgery",
    "count_parameters": "plrd.core.counting",
    "collect_grams": "plrd.core.calibrate",
    "collect_output_grams": "plrd.core.fisher",
    "collect_both_grams": "plrd.core.fisher",
    "save": "plrd.io.checkpoint",
    "load": "plrd.io.checkpoint",
    "weights_checksum": "plrd.io.checkpoint",
    "load_pretrained": "plrd.io.members",
    "decode_layout": "plrd.deploy.layout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'plrd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
