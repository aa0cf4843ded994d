"""One-row time of every linear weight shape of a parent and its members, in both layouts.

    python benchmarks/layout_sweep.py family/members/size-0.70 --threads 1

Every weight a decoding step streams through a product (each ``nn.Linear`` weight, the output
head included, and each ``LowRankLinear`` factor) is a matrix [out, in]. Each distinct shape
is timed alone at one row, ``F.linear(x, W)``, with W stored two ways: row-major [out, in]
("stored") and as the transpose of a contiguous [in, out] ("re-laid", what
``plrd.decode_layout`` does when out > in). The copies timed are views of one buffer of at
least ``COLD_BYTES``, cycled, so that every product streams its weight from memory as in
decoding. Per model, the shape times weighted by how often each shape occurs give the time of
its linears under ``decode_layout``'s rule and with the faster layout per shape; parent over
member is the decode speed-up these products allow before the rest of the block (attention,
norms, cache: the same time in both) lowers it.

Markdown and JSON go to ``benchmarks/results/`` (``--name``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from onnx_decode import RESULTS, add_run_args, load_torch, parent_dir
from time_split import weight_chain

COLD_BYTES = 160e6
"""Bytes cycled per shape: several times the last-level cache (32 MiB on the development
machine), so each weight comes from memory."""

LAYOUT_NAMES = ("stored", "re-laid")


def weight_shapes(model: torch.nn.Module) -> collections.Counter:
    """{(kind, out, in): count} over the model's weights: head, dense, down and up factors."""
    shapes: collections.Counter = collections.Counter()
    for kind, weights in weight_chain(model):
        names = ("down", "up") if kind == "factored" else (kind,)
        for name, weight in zip(names, weights, strict=True):
            shapes[(name, *weight.shape)] += 1
    return shapes


def one_row_time(buffer: torch.Tensor, n_out: int, n_in: int, relaid: bool) -> float:
    """Fastest mean seconds of ``F.linear(x, W)`` at one row over cold copies of W [out, in]."""
    size = n_out * n_in
    copies = max(2, int(COLD_BYTES // (4 * size)))
    chunks = buffer[: copies * size].view(copies, size)
    weights = [c.view(n_in, n_out).t() if relaid else c.view(n_out, n_in) for c in chunks]
    x = torch.randn(1, n_in)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for weight in weights:
            F.linear(x, weight)
        best = min(best, (time.perf_counter() - start) / copies)
    return best


def sweep(shapes: set[tuple[int, int]]) -> dict[tuple[int, int], dict[str, float]]:
    """{(out, in): {layout: seconds}} for every shape, both layouts."""
    largest = max(o * i for o, i in shapes)
    buffer = torch.randn(int(max(COLD_BYTES / 4, 2 * largest)))
    return {
        (o, i): {name: one_row_time(buffer, o, i, name == "re-laid") for name in LAYOUT_NAMES}
        for o, i in sorted(shapes)
    }


def model_totals(shapes: collections.Counter, times: dict) -> dict[str, float]:
    """Seconds a token in the model's linears: all stored, ``decode_layout``'s rule, best."""
    totals = dict.fromkeys(("stored", "decode_layout", "best"), 0.0)
    for (_, o, i), count in shapes.items():
        t = times[(o, i)]
        totals["stored"] += count * t["stored"]
        totals["decode_layout"] += count * (t["re-laid"] if o > i else t["stored"])
        totals["best"] += count * min(t.values())
    return totals


def report(models: dict, times: dict, totals: dict, threads: int) -> str:
    """Markdown: totals per model with the ratio to the parent, then the shapes by kind."""
    parent = next(iter(models))
    lines = [f"# One-row products by shape ({threads} thread(s), {datetime.date.today()})", ""]
    lines += ["## Linears of each model, ms a token (head included)", ""]
    lines += ["| model | stored | decode_layout | best layout per shape | ratio (decode_layout) |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for name, t in totals.items():
        ratio = totals[parent]["decode_layout"] / t["decode_layout"]
        cells = " | ".join(f"{t[k] * 1e3:.2f}" for k in ("stored", "decode_layout", "best"))
        lines.append(f"| {name} | {cells} | {ratio:.3f} |")
    lines += ["", "## Shapes (µs at one row, cold)", ""]
    lines += ["| kind | out × in | count (all models) | stored | re-laid | rule picks | faster |"]
    lines += ["|---|---|---:|---:|---:|---|---|"]
    counts: collections.Counter = sum(models.values(), collections.Counter())
    for (kind, o, i), count in sorted(counts.items()):
        t = times[(o, i)]
        rule = "re-laid" if o > i else "stored"
        faster = min(t, key=t.get)
        lines.append(
            f"| {kind} | {o} × {i} | {count} | {t['stored'] * 1e6:.1f} | "
            f"{t['re-laid'] * 1e6:.1f} | {rule} | {faster} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=Path, nargs="+", help="member directories")
    add_run_args(parser, threads=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {d.name: weight_shapes(load_torch(d, "saved")) for d in [parent_dir(), *args.members]}
    shapes = {(o, i) for counts in models.values() for _, o, i in counts}
    with torch.inference_mode():
        times = sweep(shapes)
    totals = {name: model_totals(counts, times) for name, counts in models.items()}
    text = report(models, times, totals, args.threads)
    print(text)
    stem = args.name or f"layout-sweep-{datetime.date.today()}-{args.threads}thread"
    (RESULTS / f"{stem}.md").write_text(text)
    payload = {
        "totals_s": totals,
        "shapes_s": {f"{o}x{i}": t for (o, i), t in times.items()},
        "counts": {
            name: {f"{k}:{o}x{i}": c for (k, o, i), c in counts.items()}
            for name, counts in models.items()
        },
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
