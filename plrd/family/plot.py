"""family.png: parameters vs perplexity of a family — on the held-out corpus and on general
text — right after each decomposition (zero-shot) and after training, the parent marked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from plrd.core.counting import format_params
from plrd.family.tasks import primary_metric
from plrd.io.atomic import atomic_path

PANELS = (
    ("zero_shot_ppl", "held_out_ppl", "held-out perplexity (corpus)"),
    ("zero_shot_general_ppl", "general_ppl", "general perplexity (never trained on)"),
)


def _panel(ax: Any, record: dict, zero_key: str, trained_key: str, title: str) -> None:
    from matplotlib.ticker import FuncFormatter

    parent = record["parent"]
    members = [m for m in record["members"] if m.get(trained_key) is not None]
    if members:
        x = [m["params"] for m in members]
        zero = [m.get(zero_key) for m in members]
        if all(z is not None for z in zero):
            ax.plot(x, zero, "o--", color="tab:orange", label="after decomposition (zero-shot)")
        ax.plot(x, [m[trained_key] for m in members], "o-", color="tab:blue", label="trained")
        for m, xi in zip(members, x, strict=True):
            label = f"{m['size']:g}: {m[trained_key]:.1f}"
            if trained_key == "general_ppl" and m.get("kl_to_parent") is not None:
                label += f" (KL {m['kl_to_parent']:.2f})"
            ax.annotate(
                label,
                (xi, m[trained_key]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
                color="tab:blue",
            )
    if parent.get(trained_key) is not None:
        ax.plot(
            [parent["params"]],
            [parent[trained_key]],
            "*",
            color="black",
            markersize=14,
            label=f"parent ({Path(str(parent['name'])).name})",
        )
        ax.annotate(
            f"{parent[trained_key]:.1f}",
            (parent["params"], parent[trained_key]),
            textcoords="offset points",
            xytext=(-10, 8),
            fontsize=8,
        )
    ax.margins(x=0.12, y=0.15)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_params(int(round(v)))))
    ax.set_xlabel("parameters")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def _task_panel(ax: Any, record: dict) -> None:
    """The headline metric of every lm-eval task scored, members and parent, vs parameters."""
    from matplotlib.ticker import FuncFormatter

    rows = [record["parent"], *record["members"]]
    names = list(dict.fromkeys(t for row in rows for t in row.get("tasks", {})))
    colors = ("tab:green", "tab:purple", "tab:red", "tab:brown", "tab:gray")
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        points = [
            (row["params"], head[1])
            for row in rows
            if (head := primary_metric(row.get("tasks", {}).get(name, {}))) is not None
        ]
        points.sort()
        ax.plot(*zip(*points, strict=True), "o-", color=color, label=name)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_params(int(round(v)))))
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("parameters (the largest is the parent)")
    ax.set_title("lm-eval tasks (headline metric)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def draw_family(record: dict) -> Any:
    """The family in ``record`` (family.json) as a matplotlib Figure: one panel per measure,
    legends below the axes, where they cannot cover a point or a label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = any(row.get("tasks") for row in [record["parent"], *record["members"]])
    panels = len(PANELS) + int(tasks)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), dpi=110)
    for ax, (zero_key, trained_key, title) in zip(axes, PANELS, strict=False):
        _panel(ax, record, zero_key, trained_key, title)
    if tasks:
        _task_panel(axes[-1], record)
    tokens = record.get("config", {}).get("tokens_per_stage")
    title = "plrd family"
    if tokens is not None:
        title += f" ({tokens:,} training tokens per stage)"
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_family(record: dict, path: str | os.PathLike) -> Path:
    """Draw the family in ``record`` (see ``draw_family``) to ``path`` (PNG), atomically."""
    import matplotlib.pyplot as plt

    fig = draw_family(record)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target
