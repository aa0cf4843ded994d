"""Decode speed, PyTorch eager vs ONNX Runtime, for SmolLM2-135M and its members (CPU, batch 1).

    python benchmarks/onnx_decode.py                       # parent + the 0.80 member
    python benchmarks/onnx_decode.py --keeps 0.8 0.6 --threads 2 --repeats 7
    python benchmarks/onnx_decode.py --members family/members/size-0.*  --threads 1

For the parent (the default SmolLM2-135M, converted once into the plrd cache) and a member per
``--keeps`` (made with ``plrd decompose --size KEEP`` unless ``--work`` already holds it), the
script (or for each directory named by ``--members``, e.g. the members of a family) exports
each model with ``plrd.deploy.onnx_export.export_onnx`` (validated against
PyTorch), then times greedy decoding of ``--new-tokens`` tokens after a short prompt:

* ``torch``: a greedy loop over the Hugging Face model (eager, ``torch.inference_mode``,
  ``DynamicCache``): one prefill pass, then one pass per new token; the weights in
  ``plrd.decode_layout`` (``--layout decode``, the default, for parent and members alike) or
  as saved (``--layout saved``);
* ``ort``: the same loop in ONNX Runtime (``OnnxCausalLM.generate``, KV cache fed back).

and batched evaluation: one forward pass over ``--eval-batch`` rows of ``--eval-len`` tokens
(no cache), PyTorch and ONNX Runtime alike.

decode tokens/s = new tokens / wall time of the whole loop (the short prefill included);
evaluation tokens/s = batch × length / wall time of the pass. Threads are
fixed (``torch.set_num_threads`` and ORT ``intra_op_num_threads``); each model/backend is
warmed up once, then timed ``--repeats`` times, models and backends alternating in a rotating
order so that load from other processes spreads over all of them; the median is reported. The
JSON (and a Markdown table beside it) goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The best way to learn a new programming language is"
LAYOUTS = {
    "decode": "`plrd.decode_layout` (each weight along its longer dimension)",
    "saved": "as saved (row-major [out, in])",
}


def parent_dir() -> Path:
    """The cached fp32 SmolLM2-135M directory (converted from the packaged GGUF on first use)."""
    from plrd.io.models import smollm2_dir

    return smollm2_dir()


def make_member(parent: Path, keep: float, out: Path) -> Path:
    """``plrd decompose --size keep`` of ``parent`` into ``out`` (skipped if it exists)."""
    if (out / "plrd.json").is_file():
        return out
    cmd = [sys.executable, "-m", "plrd", "decompose", "--size", str(keep), "--out", str(out)]
    subprocess.run([*cmd, "--model", str(parent), "--no-eval"], check=True)
    return out


def export(source: Path, out: Path, threads: int) -> dict:
    """Export ``source`` to ``out`` unless a validated export is there; its plrd-export.json."""
    from plrd.deploy.onnx_export import export_onnx

    meta = out / "plrd-export.json"
    if not (meta.is_file() and json.loads(meta.read_text())["validation"]["passed"]):
        print(export_onnx(source, out, threads=threads, overwrite=True), flush=True)
    return json.loads(meta.read_text())


def load_torch(source: Path, layout: str) -> torch.nn.Module:
    """A member (``plrd.json``) or a Hugging Face model, its weights in ``layout``."""
    import plrd

    if (source / "plrd.json").is_file():
        model = plrd.load_pretrained(source)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if layout == "decode":
        plrd.decode_layout(model)
    return model


def torch_greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy loop with the model's own cache: prefill, then one pass per token."""
    from plrd.deploy.onnx_trace import cache_kwarg, output_cache

    key = cache_kwarg(model)
    tokens, cache, step = [], None, ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(input_ids=step, use_cache=True, **({} if cache is None else {key: cache}))
            cache = output_cache(out)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(step))
    return tokens


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def torch_forward(model: torch.nn.Module, batch: torch.Tensor) -> list[int]:
    """One pass over ``batch`` [B, S] without cache; the argmax of the last position per row."""
    with torch.inference_mode():
        return model(input_ids=batch, use_cache=False).logits[:, -1].argmax(-1).tolist()


def workloads(model: dict, ids: torch.Tensor, batch: torch.Tensor, args) -> dict:
    """{(task, backend): callable returning token ids} for one model."""
    torch_model, ort = model["torch"], model["ort"]
    return {
        ("decode", "torch"): lambda: torch_greedy(torch_model, ids, args.new_tokens),
        ("decode", "ort"): lambda: ort.generate(ids.numpy(), args.new_tokens)[0, ids.shape[1] :],
        ("forward", "torch"): lambda: torch_forward(torch_model, batch),
        ("forward", "ort"): lambda: ort.forward(batch.numpy())[0][:, -1].argmax(-1),
    }


def measure(models: dict, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """{(name, task, backend): [seconds per repeat]}, plus the tokens of the last run."""
    batch = torch.randint(
        0, 32000, (args.eval_batch, args.eval_len), generator=torch.Generator().manual_seed(0)
    )
    runs = {
        (name, *key): fn
        for name, m in models.items()
        for key, fn in workloads(m, ids, batch, args).items()
    }
    order = list(runs)
    for key in order:  # warm-up
        timed(runs[key])
    seconds = {key: [] for key in order}
    tokens = {}
    for repeat in range(args.repeats):
        shift = repeat % len(order)
        for key in order[shift:] + order[:shift]:
            elapsed, out = timed(runs[key])
            seconds[key].append(elapsed)
            tokens[key] = [int(t) for t in out]
        print(
            f"repeat {repeat + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})", flush=True
        )
    return {"seconds": seconds, "tokens": tokens}


def table(rows: list[dict], task: str) -> str:
    """Markdown: tokens/s median (best) per backend, the ratio of medians to the parent's and
    the paired ratio (median over repeats of the parent's time over the model's)."""
    head = (
        "| model | params | param ratio | PyTorch tok/s | ratio | paired | ORT tok/s | ratio "
        "| paired | ORT/PyTorch |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r[task]
        cells = [f"{r['name']}", f"{r['parameters'] / 1e6:.1f}M", f"{r['param_ratio']:.3f}"]
        for backend in ("torch", "ort"):
            cells += [
                f"{t[f'{backend}_tok_s']:.1f} ({t[f'{backend}_tok_s_best']:.1f})",
                f"{t[f'{backend}_ratio']:.2f}",
                paired_cell(t, backend),
            ]
        cells.append(f"{t['ort_tok_s'] / t['torch_tok_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_cell(task_row: dict, backend: str) -> str:
    """The paired ratio and its quartiles over repeats, e.g. ``1.27 (1.24–1.30)``."""
    low, high = task_row.get(f"{backend}_paired_quartiles", (None, None))
    median = f"{task_row[f'{backend}_paired_ratio']:.2f}"
    return median if low is None else f"{median} ({low:.2f}–{high:.2f})"


def describe(payload: dict) -> str:
    """The Markdown page: how it was measured, on what, under which load, then the table."""
    info = payload["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = [f"{x:.1f}" for x in info["loadavg_at_start"] + info["loadavg_at_end"]]
    return (
        f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['threads']} thread(s) "
        f"(torch and ORT intra-op), {info['date_utc']}. {versions}. PyTorch weights: "
        f"{LAYOUTS[info.get('torch_layout', 'saved')]}.\n\n"
        f"Greedy decode, batch 1, {payload['prompt_tokens']}-token prompt + "
        f"{payload['new_tokens']} new tokens (prefill included), warm-up then "
        f"{payload['repeats']} repeats, models and backends alternating. tok/s: median "
        "(best) over repeats; ratio: median vs the parent's on the same backend; paired: "
        "median over repeats of the parent's time over the model's in the same repeat "
        "(quartiles in brackets).\n\n"
        f"Batched evaluation: one pass over {payload['eval_batch']} x {payload['eval_len']} "
        "tokens, no cache.\n\n"
        f"Load average (1/5/15 min) at start {', '.join(load[:3])}, at end "
        f"{', '.join(load[3:])}: other workers share the cores, so absolute figures are "
        "noisy; the ratios of alternated runs are steadier.\n\n"
        "## Decode\n\n" + table(payload["rows"], "decode") + "\n"
        "## Batched evaluation\n\n" + table(payload["rows"], "forward")
    )


def speeds(seconds: dict, name: str, task: str, tokens: int) -> dict:
    """tokens/s (median and best) of ``name`` on both backends for one task."""
    out = {}
    for backend in ("torch", "ort"):
        times = seconds[(name, task, backend)]
        out[f"{backend}_tok_s"] = tokens / statistics.median(times)
        out[f"{backend}_tok_s_best"] = tokens / min(times)
        out[f"{backend}_seconds"] = times
    return out


def summarize(models: dict, result: dict, args: argparse.Namespace) -> list[dict]:
    counts = {"decode": args.new_tokens, "forward": args.eval_batch * args.eval_len}
    rows = []
    for name, m in models.items():
        row = {
            "name": name,
            "parameters": m["meta"]["parameters"],
            "onnx_bytes": m["meta"]["files"]["model.onnx"],
            "export_max_abs_logit_diff": m["meta"]["validation"]["max_abs_logit_diff"],
            "same_tokens_torch_ort": result["tokens"][(name, "decode", "torch")]
            == result["tokens"][(name, "decode", "ort")],
        }
        for task, n in counts.items():
            row[task] = speeds(result["seconds"], name, task, n)
        rows.append(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """In place: each row's speed ratios to the first row (the parent) per task and backend.

    ``ratio``: median tok/s over the parent's; ``paired_ratio``: median over repeats of the
    parent's time over the model's in the same repeat, with its quartiles
    (``paired_quartiles``), which show how far a ratio moves between repeats.
    """
    parent = rows[0]
    for r in rows:
        r["param_ratio"] = r["parameters"] / parent["parameters"]
        for task in ("decode", "forward"):
            for backend in ("torch", "ort"):
                key = f"{backend}_tok_s"
                r[task][f"{backend}_ratio"] = r[task][key] / parent[task][key]
                pairs = zip(
                    parent[task][f"{backend}_seconds"], r[task][f"{backend}_seconds"], strict=True
                )
                paired = [p / m for p, m in pairs]
                r[task][f"{backend}_paired_ratio"] = statistics.median(paired)
                quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
                r[task][f"{backend}_paired_quartiles"] = [quartiles[0], quartiles[2]]


def machine(args: argparse.Namespace) -> dict:
    packages = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "plrd")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "cpu_model": cpu or platform.processor(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "torch_layout": args.layout,
        "versions": {p: version(p) for p in packages},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": list(os.getloadavg()),
    }


def add_run_args(parser: argparse.ArgumentParser, *, threads: int) -> None:
    """The options every CPU timing script takes: threads and the result file's stem."""
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--name", default=None, help="result file stem (default: date+threads)")


def add_workload_args(
    parser: argparse.ArgumentParser, *, threads: int, repeats: int, new_tokens: int
) -> None:
    """The timing options this script and ``time_split.py`` share, with their defaults."""
    add_run_args(parser, threads=threads)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument(
        "--layout", choices=("decode", "saved"), default="decode",
        help="PyTorch weights: plrd.decode_layout (default) or as saved",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.8])
    parser.add_argument("--members", type=Path, nargs="+", default=None, help="member dirs")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/plrd/onnx-bench")
    add_workload_args(parser, threads=2, repeats=5, new_tokens=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from plrd.deploy.onnx_runtime import OnnxCausalLM

    info = machine(args)
    parent = parent_dir()
    sources = {"parent": parent}
    if args.members:
        sources |= {d.name: d for d in args.members}
    else:
        for keep in args.keeps:
            name = f"member-{keep:.2f}"
            sources[name] = make_member(parent, keep, args.work / name)
    models = {}
    for name, source in sources.items():
        meta = export(source, args.work / f"onnx-{name}", args.threads)
        runner = OnnxCausalLM(args.work / f"onnx-{name}", threads=args.threads)
        models[name] = {"torch": load_torch(source, args.layout), "ort": runner, "meta": meta}
    ids = AutoTokenizer.from_pretrained(parent)(PROMPT, return_tensors="pt").input_ids
    result = measure(models, ids, args)
    rows = summarize(models, result, args)
    info["loadavg_at_end"] = list(os.getloadavg())
    stem = args.name or f"onnx-decode-{info['date_utc'][:10]}-{args.threads}threads"
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": info, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens}
    payload |= {"eval_batch": args.eval_batch, "eval_len": args.eval_len}
    payload |= {"repeats": args.repeats, "rows": rows}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = describe(payload)
    (RESULTS / f"{stem}.md").write_text(f"# ONNX Runtime vs PyTorch speed: {stem}\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
