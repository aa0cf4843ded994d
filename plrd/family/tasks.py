"""Standard benchmark scores through EleutherAI's lm-eval harness (``pip install 'plrd[eval]'``).

Each model is wrapped in lm-eval's Hugging Face adapter (``HFLM``) as it is, factored layers and
all, and scored on the named tasks. Tasks are lm-eval's own (``boolq``, ``winogrande``,
``logiqa``, ``mmlu``, ... — these download their datasets from the Hugging Face hub on first
use) or local task YAMLs in the folders given as ``include``. lm-eval resolves a local task's
``data_files`` against the working directory.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch

from plrd.errors import InputError

PRIMARY = ("acc_norm", "acc", "exact_match", "f1")


def _lm_eval() -> Any:
    try:
        import lm_eval  # heavy and optional
    except ImportError:
        raise InputError(
            "task scores need EleutherAI's lm-eval harness: pip install 'plrd[eval]'"
        ) from None
    return lm_eval


def task_manager(names: Sequence[str], include: Sequence[str] = ()) -> Any:
    """lm-eval's task index with the local task folders ``include``; ``InputError`` naming the
    first task that is neither lm-eval's nor in those folders."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include) or None)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        where = f" or in {', '.join(include)}" if include else ""
        raise InputError(
            f"unknown task {unknown[0]!r}: not an lm-eval task{where}; list lm-eval's with "
            "`lm-eval ls tasks`, or pass the folder of your task YAML with --tasks-path"
        )
    return manager


def primary_metric(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of one task's results (accuracy first), as ``(name, value)``."""
    for key in PRIMARY:
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    return None


def score(
    model: torch.nn.Module,
    tokenizer: Any,
    names: Sequence[str],
    manager: Any,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` on ``names`` (lm-eval's stderr entries left
    out); ``limit`` caps the documents per task (for quick looks, not for reporting)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    adapter = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints its own tables
        results = lm_eval.simple_evaluate(
            model=adapter, tasks=list(names), task_manager=manager, limit=limit
        )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"
        }
    return out
