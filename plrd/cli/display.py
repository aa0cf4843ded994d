"""What the ``plrd`` command prints: the family table, the description of a family or member."""

from __future__ import annotations

from collections.abc import Sequence

from plrd.core.counting import format_params
from plrd.family.tasks import primary_metric


def _columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned text: the first column left-aligned, the others right; a rule under
    the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _figure(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _task_names(record: dict) -> list[str]:
    names: dict[str, None] = {}
    for row in [record["parent"], *record["members"]]:
        names.update(dict.fromkeys(row.get("tasks", {})))
    return list(names)


def _task_cells(row: dict, names: list[str]) -> tuple[str, ...]:
    cells = []
    for name in names:
        head = primary_metric(row.get("tasks", {}).get(name, {}))
        cells.append("-" if head is None else f"{head[1]:.3f}")
    return tuple(cells)


def format_table(record: dict) -> str:
    """The family as a text table: one row for the parent, one per finished member (and a
    column per lm-eval task scored, its headline metric)."""
    parent = record["parent"]
    tasks = _task_names(record)
    threads = record.get("evaluation", {}).get("threads")
    speed = f"tok/s ({threads} threads)" if threads else "tok/s"
    header = ("member", "params", "% parent", "tokens", "zero-shot ppl", "held-out ppl")
    header += ("general ppl", "KL to parent", speed, "seconds", *tasks)
    rows = [
        header,
        (
            f"parent ({parent['name']})",
            format_params(parent["params"]),
            "100.0",
            "-",
            "-",
            _figure(parent["held_out_ppl"]),
            _figure(parent.get("general_ppl")),
            "0",
            f"{parent['tokens_per_s']:.0f}",
            "-",
            *_task_cells(parent, tasks),
        ),
    ]
    for m in record["members"]:
        rows.append(
            (
                m["path"],
                format_params(m["params"]),
                f"{100 * m['params'] / parent['params']:.1f}",
                f"{m['tokens']:,}",
                _figure(m["zero_shot_ppl"]),
                _figure(m["held_out_ppl"]),
                _figure(m.get("general_ppl")),
                _figure(m.get("kl_to_parent"), 3),
                f"{m['tokens_per_s']:.0f}",
                f"{m['seconds']:.0f}",
                *_task_cells(m, tasks),
            )
        )
    return _columns(rows)


def describe_family(root: str, record: dict) -> str:
    cfg = record.get("config", {})
    return (
        f"family in {root}: parent {record['parent']['name']}, "
        f"{len(record['members'])} finished of sizes "
        f"{','.join(f'{s:g}' for s in cfg.get('sizes', []))}; objective "
        f"{cfg.get('objective')}, method {cfg.get('method')}, allocation "
        f"{cfg.get('allocation')}, {cfg.get('tokens_per_stage', 0):,} tokens per stage\n\n"
        + format_table(record)
    )


def describe_member(root: str, info: dict, params: int, metrics: dict | None) -> str:
    """A member's parameters, rank range, metrics and per-layer ranks (from its plrd.json)."""
    layers = info["layers"]
    lines = [
        f"member {root}: {format_params(params)} parameters, {len(layers)} factored layers "
        "(weights verified)"
    ]
    if layers:
        fractions = [e["rank"] * (e["in"] + e["out"]) / (e["in"] * e["out"]) for e in layers]
        ranks = [e["rank"] for e in layers]
        lines.append(
            f"ranks {min(ranks)}..{max(ranks)}; factored weights keep "
            f"{min(fractions):.1%}..{max(fractions):.1%} of their dense size"
        )
    if metrics:
        lines.append(
            ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
        )
    lines.append("")
    lines.append("layer                                     out x in     rank")
    for e in layers:
        lines.append(f"{e['name']:<40}  {e['out']:>5} x {e['in']:<5}  {e['rank']:>5}")
    return "\n".join(lines)
