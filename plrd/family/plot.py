"""family.png: parameters vs held-out perplexity of a family (zero-shot and trained)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from plrd.core.counting import format_params
from plrd.io.atomic import atomic_path


def draw_family(manifest: dict) -> Any:
    """The family in ``manifest`` (family.json) as a matplotlib Figure.

    x: parameters; y: held-out perplexity (log scale). One line for the members right after
    decomposition (zero-shot), one after training, the parent as a star; each point labelled.
    The legend sits below the axes, where it cannot cover a point or a label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    parent = manifest["parent"]
    members = manifest["members"]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    if members:
        x = [m["params"] for m in members]
        ax.plot(
            x,
            [m["zero_shot_ppl"] for m in members],
            "o--",
            color="tab:orange",
            label="after decomposition (zero-shot)",
        )
        ax.plot(
            x, [m["held_out_ppl"] for m in members], "o-", color="tab:blue", label="after training"
        )
        for m, xi in zip(members, x, strict=True):
            ax.annotate(
                f"{m['size']:g}: {m['held_out_ppl']:.1f}",
                (xi, m["held_out_ppl"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
                color="tab:blue",
            )
    ax.plot(
        [parent["params"]],
        [parent["held_out_ppl"]],
        "*",
        color="black",
        markersize=14,
        label=f"parent ({Path(str(parent['name'])).name})",
    )
    ax.annotate(
        f"{parent['held_out_ppl']:.1f}",
        (parent["params"], parent["held_out_ppl"]),
        textcoords="offset points",
        xytext=(-10, 8),
        fontsize=8,
    )
    ax.margins(x=0.1, y=0.15)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_params(int(round(v)))))
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out perplexity")
    tokens = manifest.get("config", {}).get("tokens_per_stage")
    title = "plrd family"
    if tokens is not None:
        title += f" ({tokens:,} training tokens per stage)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def plot_family(manifest: dict, path: str | os.PathLike) -> Path:
    """Draw the family in ``manifest`` (see ``draw_family``) to ``path`` (PNG), atomically."""
    import matplotlib.pyplot as plt

    fig = draw_family(manifest)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
