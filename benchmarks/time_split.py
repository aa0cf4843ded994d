"""Where a member's CPU time goes, beside its parent's: output head, dense linears, factored
linears, and the rest of the blocks; then the factored layers alone against their dense twins.

    python benchmarks/time_split.py family/members/size-0.70 --threads 1

1. Whole models (the parent, then each member directory): one batched pass over ``--eval-batch``
   × ``--eval-len`` tokens and ``--new-tokens`` greedy decode steps, models alternated,
   ``--repeats`` times; forward hooks on every ``nn.Linear`` and ``LowRankLinear`` sum the time
   spent inside them by kind. The hooks cost a few microseconds a layer, so at one row per step
   the split is approximate; the totals are the same timings ``onnx_decode.py`` takes.
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
import collections
import datetime
import functools
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

COPIES = 40
"""Copies of a layer's weights cycled at one row: 40 × a 576 × 576 layer exceed the 48 MB L3."""


class KindTimer:
    """Forward hooks that add each linear's wall time to its kind: head, dense, factored."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self._start: dict[int, float] = {}
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, LowRankLinear)):
                kind = (
                    "head"
                    if module is head
                    else "factored"
                    if isinstance(module, LowRankLinear)
                    else "dense"
                )
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(lambda mod, args, out, k=kind: self._leave(mod, k))

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leave(self, module: torch.nn.Module, kind: str) -> None:
        self.seconds[kind] += time.perf_counter() - self._start[id(module)]

    def split(self, fn) -> dict[str, float]:
        """Run ``fn``; its wall time split into head / dense / factored / rest seconds."""
        self.seconds.clear()
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
        split = {k: self.seconds.get(k, 0.0) for k in ("head", "dense", "factored")}
        split["rest"] = total - sum(split.values())
        split["total"] = total
        return split


def whole_models(dirs: list[Path], args: argparse.Namespace) -> dict[str, dict]:
    """{model: {task: median split}} with the models alternated ``args.repeats`` times."""
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    batch = torch.randint(
        0, 49152, (args.eval_batch, args.eval_len), generator=torch.Generator().manual_seed(1)
    )
    models = {d.name: load_torch(d, args.layout) for d in dirs}
    timers = {name: KindTimer(m) for name, m in models.items()}
    tasks = {
        "forward": lambda m: torch_forward(m, batch),
        "decode": lambda m: torch_greedy(m, ids, args.new_tokens),
    }
    runs = {name: {task: [] for task in tasks} for name in models}
    for model in models.values():
        for fn in tasks.values():
            fn(model)
    for _ in range(args.repeats):
        for name, model in models.items():
            for task, fn in tasks.items():
                runs[name][task].append(timers[name].split(functools.partial(fn, model)))
    return {
        name: {
            task: {k: statistics.median(r[k] for r in splits) for k in splits[0]}
            for task, splits in per_task.items()
        }
        for name, per_task in runs.items()
    }


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
    parent = next(iter(split))
    lines = [f"# Where the time goes ({args.threads} thread(s), {datetime.date.today()})", ""]
    lines += [f"PyTorch weights: {LAYOUTS[args.layout]}.", ""]
    for task, unit in (("forward", "s a pass"), ("decode", "ms a token")):
        scale = 1.0 if task == "forward" else 1e3 / args.new_tokens
        lines += [
            f"## {task} ({unit}; median of {args.repeats})",
            "",
            "| model | head | dense | factored | rest | total | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, per_task in split.items():
            s = per_task[task]
            speedup = split[parent][task]["total"] / s["total"]
            cells = [f"{s[k] * scale:.3g}" for k in ("head", "dense", "factored", "rest", "total")]
            lines.append(f"| {name} | {' | '.join(cells)} | {speedup:.2f}× |")
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
