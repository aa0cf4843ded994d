"""family.png: parameters vs held-out perplexity of a family (zero-shot and trained)."""

from __future__ import annotations

import os
from pathlib import Path

from plrd.atomic import atomic_path


def plot_family(manifest: dict, path: str | os.PathLike) -> Path:
    """Draw the family in ``manifest`` (family.json) to ``path`` (PNG), atomically.

    x: parameters (millions); y: held-out perplexity (log scale). One line for the members right
    after decomposition (zero-shot), one after training, the parent as a star.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = manifest["parent"]
    members = manifest["members"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if members:
        x = [m["params"] / 1e6 for m in members]
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
        [parent["params"] / 1e6],
        [parent["held_out_ppl"]],
        "*",
        color="black",
        markersize=14,
        label=f"parent ({Path(str(parent['name'])).name})",
    )
    ax.annotate(
        f"{parent['held_out_ppl']:.1f}",
        (parent["params"] / 1e6, parent["held_out_ppl"]),
        textcoords="offset points",
        xytext=(-10, 8),
        fontsize=8,
    )
    ax.margins(x=0.08, y=0.12)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("held-out perplexity")
    tokens = manifest.get("config", {}).get("tokens_per_stage")
    title = "plrd family"
    if tokens is not None:
        title += f" ({tokens:,} training tokens per stage)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")  # small and good: usually empty
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
