"""Where a member's CPU time goes, beside its parent's: output head, dense linears, factored
linears, and the rest of the blocks; then the factored layers alone against their dense twins.

    python benchmarks/time_split.py family/members/size-0.70 --threads 1

1. Whole models (the parent, then each member directory): one batched pass over ``--eval-batch``
   × ``--eval-len`` tokens and ``--new-tokens`` greedy decode steps, models alternated in a
   rotating order, ``--repeats`` times. After each, the same products are replayed alone: every
   weight the model multiplies (head, dense weights, the down and up factors), its own tensors
   in module order, one ``F.linear`` each at the task's rows (the mean of ``REPLAYS`` passes
   per decode step, the prefill counted as a step). Rest = total − products: attention, norms,
   rotary embedding, cache, module and Python overhead, and whatever the products lose in the
   model against running alone. No hooks, so the totals are the timings ``onnx_decode.py``
   takes; speed-ups are the parent's time over the model's, paired by repeat.
2. Each member's factored layers on their own, at the ranks the member holds: two products
   ``(x·downᵀ)·upᵀ`` against one dense ``x·Wᵀ`` of the same shape, at one row (``COPIES`` copies
   of the weights cycled, so that they stream from memory as in decoding) and at
   ``eval_batch · eval_len`` rows. Time ratio beside the bytes ratio says how much of the
   parameter saving the skinny products turn into speed; "slower" counts the layers whose
   factored form is slower than dense at that many rows.

Medians are printed and written as JSON to ``benchmarks/results/`` (``--name``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from onnx_decode import (
    LAYOUTS,
    RESULTS,
    add_workload_args,
    load_torch,
    parent_dir,
    torch_forward,
    torch_greedy,
)

from plrd.core.layer import LowRankLinear

KINDS = ("head", "dense", "factored")
"""The linears by kind: the output head, dense layers, factored layers (down then up)."""

REPLAYS = {"forward": 1, "decode": 8}
"""Replayed passes of the products per repeat: a decode step's pass is short, so take a mean."""

COPIES = 40
"""Copies of a layer's weights cycled at one row: 40 × a 576 × 576 layer exceed the 48 MB L3."""


def weight_chain(model: torch.nn.Module) -> list[tuple[str, list[torch.Tensor]]]:
    """(kind, weights) per linear in module order: head, dense, or factored (down, up)."""
    head = model.get_output_embeddings()
    chain = []
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            chain.append(("factored", [module.down, module.up]))
        elif isinstance(module, torch.nn.Linear):
            chain.append(("head" if module is head else "dense", [module.weight]))
    return chain


def replay_products(chain: list, rows: int) -> dict[str, float]:
    """Seconds by kind of one pass of ``F.linear`` over ``chain`` at ``rows`` rows.

    Each product multiplies the model's own weight tensors, in module order, so that they
    stream from memory as in the model, with nothing else between them.
    """
    seconds = dict.fromkeys(KINDS, 0.0)
    inputs = {}
    for kind, weights in chain:
        n_in = weights[0].shape[1]
        if n_in not in inputs:
            inputs[n_in] = torch.randn(rows, n_in)
        start = time.perf_counter()
        y = inputs[n_in]
        for weight in weights:
            y = F.linear(y, weight)
        seconds[kind] += time.perf_counter() - start
    return seconds


def whole_models(dirs: list[Path], args: argparse.Namespace) -> dict[str, dict]:
    """{model: {task: median split}}: each task's wall time and its products replayed alone.

    Per repeat, models in a rotating order: the task (``--new-tokens`` greedy steps, or one pass
    over ``--eval-batch`` × ``--eval-len`` tokens), then its products replayed (``REPLAYS``
    passes at one row for decode, scaled to the steps; one at the pass's rows for the forward).
    Rest = total − products.
    """
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(
        0, 49152, (args.eval_batch, args.eval_len), generator=torch.Generator().manual_seed(1)
    )
    models = {d.name: load_torch(d, args.layout) for d in dirs}
    chains = {name: weight_chain(m) for name, m in models.items()}
    tasks = {
        "forward": (lambda m: torch_forward(m, batch), 1, args.eval_batch * args.eval_len),
        "decode": (lambda m: torch_greedy(m, ids, args.new_tokens), args.new_tokens, 1),
    }
    runs = {name: {task: [] for task in tasks} for name in models}
    for model in models.values():
        for fn, _, _ in tasks.values():
            fn(model)
    names = list(models)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            model = models[name]
            for task, (fn, steps, rows) in tasks.items():
                start = time.perf_counter()
                fn(model)
                total = time.perf_counter() - start
                passes = [replay_products(chains[name], rows) for _ in range(REPLAYS[task])]
                split = {k: steps * statistics.mean(p[k] for p in passes) for k in KINDS}
                split["total"] = total
                split["products"] = sum(split[k] for k in KINDS)
                split["rest"] = split["total"] - split["products"]
                runs[name][task].append(split)
    return {name: summarize(per_task, runs[dirs[0].name]) for name, per_task in runs.items()}


def summarize(per_task: dict[str, list[dict]], parent: dict[str, list[dict]]) -> dict:
    """Medians over repeats, and the parent's time over this model's paired by repeat."""
    summary = {}
    for task, splits in per_task.items():
        medians = {k: statistics.median(r[k] for r in splits) for k in splits[0]}
        for key in ("products", "total"):
            ratios = [p[key] / r[key] for p, r in zip(parent[task], splits, strict=True)]
            medians[f"paired_{key}"] = statistics.median(ratios)
        summary[task] = medians
    return summary


def _best(fn, items: list, rounds: int = 3) -> float:
    """Fastest mean time of ``fn(item)`` over ``items``, ``rounds`` passes after a warm-up."""
    for item in items:
        fn(item)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best


def factored_layers(member: Path, rows: int) -> dict[str, float]:
    """Sum over the member's factored layers of dense and factored time at ``rows`` rows."""
    layers = json.loads((member / "plrd.json").read_text())["layers"]
    copies = COPIES if rows == 1 else 1
    times: dict[tuple, float] = {}
    dense = factored = dense_params = factored_params = 0.0
    slower = 0
    for layer in layers:
        n_in, n_out, rank = layer["in"], layer["out"], layer["rank"]
        x = torch.randn(rows, n_in)
        if (n_in, n_out) not in times:
            weights = [torch.randn(n_out, n_in) for _ in range(copies)]
            times[(n_in, n_out)] = _best(lambda w, x=x: F.linear(x, w), weights)
        if (n_in, n_out, rank) not in times:
            pairs = [(torch.randn(rank, n_in), torch.randn(n_out, rank)) for _ in range(copies)]
            times[(n_in, n_out, rank)] = _best(
                lambda p, x=x: F.linear(F.linear(x, p[0]), p[1]), pairs
            )
        slower += times[(n_in, n_out, rank)] > times[(n_in, n_out)]
        dense += times[(n_in, n_out)]
        factored += times[(n_in, n_out, rank)]
        dense_params += n_in * n_out
        factored_params += rank * (n_in + n_out)
    return {
        "layers": len(layers),
        "slower_than_dense": slower,
        "dense_s": dense,
        "factored_s": factored,
        "time_ratio": dense / factored,
        "bytes_ratio": dense_params / factored_params,
    }


def report(split: dict, layers: dict, args: argparse.Namespace) -> str:
    """Markdown tables of the split (ms, speed-up over the parent) and the layer ratios."""
    lines = [f"# Where the time goes ({args.threads} thread(s), {datetime.date.today()})", ""]
    lines += [f"PyTorch weights: {LAYOUTS[args.layout]}.", ""]
    for task, unit in (("forward", "s a pass"), ("decode", "ms a token")):
        scale = 1.0 if task == "forward" else 1e3 / args.new_tokens
        lines += [
            f"## {task} ({unit}; median of {args.repeats}; speed-ups paired by repeat)",
            "",
            "| model | head | dense | factored | rest | total | products speed-up | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, per_task in split.items():
            s = per_task[task]
            cells = [f"{s[k] * scale:.3g}" for k in (*KINDS, "rest", "total")]
            cells += [f"{s[k]:.2f}×" for k in ("paired_products", "paired_total")]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines.append("")
    lines += [
        "## factored layers alone vs dense twins",
        "",
        "| member | rows | layers | slower | dense | factored | time ratio | bytes ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, rows), r in layers.items():
        lines.append(
            f"| {name} | {rows} | {r['layers']} | {r['slower_than_dense']} | "
            f"{r['dense_s'] * 1e3:.1f} ms | "
            f"{r['factored_s'] * 1e3:.1f} ms | {r['time_ratio']:.2f} | {r['bytes_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=Path, nargs="+", help="member directories")
    add_workload_args(parser, threads=1, repeats=3, new_tokens=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        split = whole_models([parent_dir(), *args.members], args)
        layers = {
            (m.name, rows): factored_layers(m, rows)
            for m in args.members
            for rows in (1, args.eval_batch * args.eval_len)
        }
    text = report(split, layers, args)
    print(text)
    stem = args.name or f"time-split-{datetime.date.today()}-{args.threads}thread"
    (RESULTS / f"{stem}.md").write_text(text)
    payload = {"split": split, "layers": {f"{n}@{r}": v for (n, r), v in layers.items()}}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
