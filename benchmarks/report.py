"""Turn a pytest-benchmark JSON result of ``benchmarks/`` into markdown tables and PNG plots.

    python benchmarks/report.py RESULT.json [--out-dir DIR] [--name NAME]

Writes ``DIR/NAME.md`` (tables) and ``DIR/NAME-layer-speedup.png`` (factored-layer speedup vs
kept fraction) and ``DIR/NAME-models.png`` (tokens/s vs parameters: members vs dense models)
and prints the markdown. DIR defaults to the JSON's folder's parent when the JSON sits in a
pytest-benchmark storage folder (``results/<machine id>/NNNN_name.json``), else the JSON's
folder; NAME defaults to the JSON's name without the ``NNNN_`` counter.

Times are the fastest round ("min"): on a shared machine other processes only ever add time,
so the minimum is the least disturbed estimate. The targets table uses the paired A/B cases
(alternating calls; median of the per-pair ratios).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

#: (paired-case test name prefix, description, threshold on the speedup).
TARGETS = (
    (
        "test_layer_paired[square-2048to2048-fwd-cpu-keep0.25]",
        "LowRankLinear keep 0.25 vs nn.Linear, 2048→2048, batch 512, forward",
        2.5,
    ),
    (
        "test_model_forward_paired[member-keep0.50-vs-parent]",
        "SmolLM2-shaped model decomposed to keep 0.5 vs dense parent, forward",
        1.3,
    ),
    (
        "test_model_forward_paired[member-keep0.50-vs-dense-same-size]",
        "member keep 0.5 vs dense model of the same parameter count (hidden/MLP 384/1058), forward",
        0.9,
    ),
    (
        "test_model_forward_paired[member-keep0.50-vs-dense-same-width]",
        "(diagnostic) member keep 0.5 vs dense model of the same parameter count at the "
        "parent's hidden width (576/239), forward",
        0.9,
    ),
)


LABELS = {
    "member": "plrd member (factored)",
    "dense-same-size": "dense, same size (narrower hidden and MLP)",
    "dense-same-width": "dense, same size, parent's hidden width",
    "parent": "dense parent",
}


def load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_section(data: dict[str, Any]) -> str:
    info = data.get("machine_info", {})
    versions = info.get("versions", {})
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    load_start = info.get("loadavg_at_start")
    load_end = info.get("loadavg_at_end")
    lines = [
        f"- Machine: {info.get('cpu_model', '?')}, {info.get('cpu_cores', '?')} cores, "
        f"torch threads {info.get('torch_threads', '?')}"
        + (f", GPU {info['cuda_device']}" if info.get("cuda_device") else ", no GPU"),
        f"- Date (UTC): {info.get('date_utc', data.get('datetime', '?'))}",
        f"- Versions: python {info.get('python_version', '?')}, {version_text}",
    ]
    if load_start or load_end:
        fmt = lambda load: "?" if not load else "/".join(f"{x:.1f}" for x in load)
        lines.append(
            f"- Load average (1/5/15 min) at start {fmt(load_start)}, at end {fmt(load_end)}"
        )
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- Commit: {commit['id'][:10]}" + (" (dirty)" if commit.get("dirty") else ""))
    return "\n".join(lines)


def _goal(threshold: float) -> str:
    if threshold >= 1:
        return f"≥ {threshold:g}×"
    return f"≥ {threshold:g}× (within {1 - threshold:.0%})"


def targets_section(benchmarks: list[dict[str, Any]]) -> str:
    by_name = {b["name"]: b for b in benchmarks}
    rows = []
    for name, text, threshold in TARGETS:
        bench = by_name.get(name)
        if bench is None:
            rows.append([text, _goal(threshold), "not run", "", ""])
            continue
        extra = bench["extra_info"]
        median = extra["speedup_median_of_pairs"]
        goal = _goal(threshold)
        rows.append(
            [
                text,
                goal,
                f"**{median:.2f}×**",
                f"{extra['speedup_min']:.2f}×",
                "met" if median >= threshold else "MISSED",
            ]
        )
    header = ["comparison", "target", "speedup (median of pairs)", "speedup (min/min)", ""]
    return _table(header, rows)


def _layer_label(extra: dict[str, Any]) -> str:
    return extra["device"] if extra["device"] == "cpu" else f"{extra['device']}/{extra['backend']}"


def layer_rows(benchmarks: list[dict[str, Any]]) -> dict[tuple, dict]:
    """{(shape, pass, device, backend): {keep | None: min seconds}}, dense under None."""
    table: dict[tuple, dict] = defaultdict(dict)
    for bench in benchmarks:
        extra = bench["extra_info"]
        if extra.get("kind") != "layer":
            continue
        key = (extra["shape"], extra["tokens"], extra["pass"], extra["device"])
        slot = "dense" if extra["keep"] is None else (extra["backend"], extra["keep"])
        table[key][slot] = bench["stats"]["min"]
    return table


def layer_section(benchmarks: list[dict[str, Any]]) -> str:
    table = layer_rows(benchmarks)
    keeps = sorted({slot[1] for row in table.values() for slot in row if slot != "dense"})[::-1]
    header = ["layer (in→out)", "M", "pass", "device", "dense ms"] + [
        f"keep {keep:g}: ms (speedup)" for keep in keeps
    ]
    rows = []
    for (shape, tokens, passes, device), row in table.items():
        dense = row.get("dense")
        backends = sorted({slot[0] for slot in row if slot != "dense"})
        for backend in backends:
            cells = []
            for keep in keeps:
                t = row.get((backend, keep))
                if t is None:
                    cells.append("")
                elif dense is None:
                    cells.append(_ms(t))
                else:
                    cells.append(f"{_ms(t)} ({dense / t:.2f}×)")
            label = device if device == "cpu" else f"{device} {backend}"
            rows.append([shape, str(tokens), passes, label, _ms(dense) if dense else ""] + cells)
    return _table(header, rows)


def decompose_section(benchmarks: list[dict[str, Any]]) -> str:
    parts = []
    factor = [b for b in benchmarks if b["extra_info"].get("kind") == "factor"]
    if factor:
        rows = [
            [
                b["extra_info"]["shape"],
                str(b["extra_info"]["rank"]),
                b["extra_info"]["method"],
                _ms(b["stats"]["min"]),
            ]
            for b in factor
        ]
        parts.append(_table(["layer (in→out)", "rank", "method", "ms"], rows))
    pairs: dict[tuple, dict] = defaultdict(dict)
    for b in benchmarks:
        extra = b["extra_info"]
        if extra.get("kind") == "retruncate":
            key = (extra["case"], extra["gram"])
            pairs[key][extra["path"]] = b["stats"]["min"]
    if pairs:
        rows = []
        for (case, gram), times in pairs.items():
            qr, dense = times.get("qr-core"), times.get("dense-svd")
            ratio = f"**{dense / qr:.1f}×**" if qr and dense else ""
            rows.append(
                [
                    case,
                    "whitened" if gram == "gram" else "plain",
                    _ms(qr) if qr else "",
                    _ms(dense) if dense else "",
                    ratio,
                ]
            )
        header = ["re-truncation", "norm", "QR core ms", "dense SVD ms", "QR-core speedup"]
        parts.append(_table(header, rows))
    grams = {
        b["extra_info"]["what"]: b for b in benchmarks if b["extra_info"].get("kind") == "grams"
    }
    if grams:
        rows = []
        forward = grams.get("forward-only")
        for what, b in grams.items():
            t = b["stats"]["min"]
            tokens = b["extra_info"]["tokens"]
            over = f"{t / forward['stats']['min']:.2f}×" if forward else ""
            rows.append([what, str(tokens), _ms(t), f"{tokens / t:,.0f}", over])
        parts.append(_table(["Gram collection", "tokens", "ms", "tokens/s", "vs forward"], rows))
    return "\n\n".join(parts)


def _model_id_keep(model_id: str) -> float | None:
    match = re.search(r"keep([0-9.]+)$", model_id)
    return float(match.group(1)) if match else None


def model_groups(benchmarks: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """{group: {model id: extra_info}} for the model benchmarks."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        extra = b["extra_info"]
        if extra.get("kind") == "model":
            groups[b["group"]][extra["model"]] = extra
    return groups


def model_section(benchmarks: list[dict[str, Any]]) -> str:
    parts = []
    for group, models in model_groups(benchmarks).items():
        parent = models.get("parent")
        rows = []
        for model_id, extra in models.items():
            speed = extra["tokens_per_s"]
            vs_parent = f"{speed / parent['tokens_per_s']:.2f}×" if parent else ""
            vs_dense = ""
            keep = _model_id_keep(model_id)
            if model_id.startswith("member") and keep is not None:
                dense = models.get(f"dense-same-size-keep{keep:.2f}")
                if dense:
                    vs_dense = f"{speed / dense['tokens_per_s']:.2f}×"
            rows.append(
                [
                    model_id,
                    f"{extra['params'] / 1e6:.1f}M",
                    f"{extra['hidden_size']}/{extra['intermediate_size']}",
                    f"{speed:,.0f}",
                    f"{extra['tokens_per_s_median']:,.0f}",
                    vs_parent,
                    vs_dense,
                ]
            )
        header = [
            "model",
            "params",
            "hidden/MLP",
            "tokens/s (best)",
            "tokens/s (median)",
            "vs parent",
            "member vs same-size dense",
        ]
        parts.append(f"**{group}**\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def plot_layers(benchmarks: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = layer_rows(benchmarks)
    passes = sorted({key[2] for key in table}, key=lambda p: len(p))
    if not passes:
        return False
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4), squeeze=False)
    for ax, passes_name in zip(axes[0], passes, strict=True):
        for (shape, tokens, p, device), row in table.items():
            dense = row.get("dense")
            if p != passes_name or dense is None:
                continue
            for backend in sorted({slot[0] for slot in row if slot != "dense"}):
                keeps = sorted(slot[1] for slot in row if slot != "dense" and slot[0] == backend)
                speedups = [dense / row[(backend, keep)] for keep in keeps]
                label = f"{shape} M={tokens} {device}" + ("" if device == "cpu" else f" {backend}")
                ax.plot(keeps, speedups, marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("kept fraction of the layer's parameters")
        ax.set_ylabel("speedup over nn.Linear (min time)")
        ax.set_title(f"LowRankLinear {passes_name}")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_models(benchmarks: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = model_groups(benchmarks)
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (group, models) in zip(axes[0], groups.items(), strict=True):
        kinds = (
            ("member", "o", "tab:blue"),
            ("dense-same-size", "s", "tab:orange"),
            ("dense-same-width", "^", "tab:green"),
            ("parent", "*", "tab:red"),
        )
        for kind, marker, color in kinds:
            points = sorted(
                (extra["params"] / 1e6, extra["tokens_per_s"])
                for model_id, extra in models.items()
                if model_id.rpartition("-keep")[0] == kind or model_id == kind
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker=marker,
                    color=color,
                    markersize=9 if kind == "parent" else 6,
                    label=LABELS[kind],
                )
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("tokens/s (best round)")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(data: dict[str, Any], plots: dict[str, str]) -> str:
    benchmarks = data["benchmarks"]
    sections = [
        "### Machine\n\n" + machine_section(data),
        "### Targets (paired A/B: alternating calls, median of per-pair ratios)\n\n"
        + targets_section(benchmarks),
    ]
    layer = layer_section(benchmarks)
    if layer.count("\n") > 1:
        sections.append("### Layers (fastest round; speedup over nn.Linear)\n\n" + layer)
    if "layers" in plots:
        sections.append(f"![layer speedup vs kept fraction]({plots['layers']})")
    models = model_section(benchmarks)
    if models:
        sections.append("### Models (SmolLM2-135M-shaped Llama, random weights, fp32)\n\n" + models)
    if "models" in plots:
        sections.append(f"![tokens/s vs parameters]({plots['models']})")
    decompose = decompose_section(benchmarks)
    if decompose:
        sections.append("### Decomposition (fastest round)\n\n" + decompose)
    return "\n\n".join(sections) + "\n"


def default_out_dir(json_path: Path) -> Path:
    parent = json_path.parent
    if re.match(r"^\d{4}_", json_path.name) and parent.parent.name == "results":
        return parent.parent
    return parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="pytest-benchmark JSON (--benchmark-json/save)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write .md and .png")
    parser.add_argument("--name", default=None, help="output file stem")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)

    data = load(args.result)
    out_dir = args.out_dir or default_out_dir(args.result)
    name = args.name or re.sub(r"^\d{4}_", "", args.result.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    if not args.no_plots:
        if plot_layers(data["benchmarks"], out_dir / f"{name}-layer-speedup.png"):
            plots["layers"] = f"{name}-layer-speedup.png"
        if plot_models(data["benchmarks"], out_dir / f"{name}-models.png"):
            plots["models"] = f"{name}-models.png"
    text = render(data, plots)
    (out_dir / f"{name}.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
