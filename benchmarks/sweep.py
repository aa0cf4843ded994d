"""Kernel sweep: the fused low-rank op against its peers, forward and forward + backward.

Peers: ``torch`` (two cuBLAS GEMMs through torch, eager), ``compile`` (the same chain under
``torch.compile(mode="max-autotune")``) and ``dense`` (the ``nn.Linear`` the factors replace).
bf16, timed with ``triton.testing.do_bench`` (median, L2 flushed between runs). Shapes and
roofline constants: benchmarks/shapes.py.

    python benchmarks/sweep.py                 # on a CUDA machine (about 4 minutes)
    python benchmarks/sweep.py --dry-run       # anywhere: tiny shapes, CPU interpreter
    python benchmarks/sweep.py --roofline-table

Prints a summary table last (per case and mode: fused ms, TFLOP/s, GB/s, % of the roofline
floor, the peers' time over the fused time, what ``PLRD_BACKEND=auto`` picks); writes
sweep.csv, sweep.json (and sweep.png with matplotlib) to ``--out`` or ``$OUT`` when set.
A time budget (``--budget``) stops the sweep early and lists what it skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import shapes  # noqa: E402
from shapes import Case  # noqa: E402

PROVIDERS = ("fused", "torch", "compile", "dense")
COMPILE_RESERVE_S = 100.0
"""A max-autotune compile starts only with at least this much budget left."""
MAX_REL_ERR = 2e-2
"""A fused result further than this from fp32 torch is flagged with "!" in the table."""
COMPILE_RANK_ORDER = (64, 256, 128, 1024)
"""The target-shape ranks that get the torch.compile peer first (``--compile-cases`` of them)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds before stopping")
    parser.add_argument(
        "--compile-cases",
        type=int,
        default=2,
        help="target cases that get the torch.compile peer (ranks in COMPILE_RANK_ORDER)",
    )
    parser.add_argument("--kinds", default="target,training,decode", help="case kinds to run")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="results folder")
    parser.add_argument("--roofline-table", action="store_true", help="print it and exit")
    parser.add_argument("--note", default="", help="a line printed just above the table")
    return parser.parse_args(argv)


def dry_cases() -> list[Case]:
    return [
        Case("target", 33, 40, 24, 17),
        Case("training", 64, 64, 48, 4),
        Case("decode", 1, 64, 48, 8),
    ]


class Timer:
    """``ms(fn, grads)``: median milliseconds of ``fn``; ``grads`` get ``.grad = None`` first."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def ms(self, fn: Callable[[], object], grads: list) -> float:
        if self.cuda:
            import triton.testing

            return float(
                triton.testing.do_bench(
                    fn, warmup=10, rep=40, grad_to_none=grads, return_mode="median"
                )
            )
        fn()  # warm-up (compiles, first-call work)
        times = []
        for _ in range(2):
            for g in grads:
                g.grad = None
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[len(times) // 2]


def measure_peaks(torch) -> dict[str, float]:
    """Quick bf16 GEMM FLOP/s and copy bandwidth on this GPU (a check on the constants)."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=50, return_mode="median")
    src = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return {
        "gemm_tflops": 2 * 8192**3 / (gemm_ms * 1e-3) / 1e12,
        "copy_tb_s": 2 * src.numel() / (copy_ms * 1e-3) / 1e12,
    }


def make_inputs(torch, case: Case, device: str, dtype) -> dict:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    x = rand(case.m, case.k)
    return {
        "x": x.requires_grad_(),
        "down": rand(case.r, case.k, scale=case.k**-0.5).requires_grad_(),
        "up": rand(case.n, case.r, scale=case.r**-0.5).requires_grad_(),
        "bias": rand(case.n).requires_grad_(),
        "weight": rand(case.n, case.k, scale=case.k**-0.5).requires_grad_(),
        "grad_y": rand(case.m, case.n),
    }


def bench_case(torch, case: Case, backward: bool, fns: dict, timer: Timer, t: dict) -> dict:
    """Median ms per provider for one case and mode (NaN + error text where one fails)."""
    factored = [t["x"], t["down"], t["up"], t["bias"]]
    dense = [t["x"], t["weight"], t["bias"]]
    results: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        inputs = dense if name == "dense" else factored
        mark = getattr(fn, "mark_step", None)

        if backward:

            def run(fn=fn, inputs=inputs, mark=mark):
                if mark is not None:
                    mark()
                fn(*inputs).backward(t["grad_y"])

            grads = inputs
        else:

            def run(fn=fn, inputs=inputs, mark=mark):
                if mark is not None:
                    mark()
                with torch.no_grad():
                    fn(*inputs)

            grads = []
        try:
            results[name] = timer.ms(run, grads)
        except Exception as exc:  # one provider failing must not end the sweep
            results[name] = math.nan
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
    return {"ms": results, "errors": errors}


def fused_error(torch, fused: Callable, reference: Callable, t: dict, backward: bool) -> float:
    """Largest relative Frobenius error of the fused output (and gradients) against the torch
    chain in fp32: checks the autotuned configs on the real shapes."""
    from plrd_kernels.reference import relative_error

    names = ("x", "down", "up", "bias")
    leaves = [t[n].detach().requires_grad_(backward) for n in names]
    ref_leaves = [t[n].detach().float().requires_grad_(backward) for n in names]
    with torch.set_grad_enabled(backward):
        y, y_ref = fused(*leaves), reference(*ref_leaves)
    errors = [relative_error(y, y_ref)]
    if backward:
        grads = torch.autograd.grad(y, leaves, t["grad_y"])
        grads_ref = torch.autograd.grad(y_ref, ref_leaves, t["grad_y"].float())
        errors += [relative_error(g, r) for g, r in zip(grads, grads_ref, strict=True)]
    return max(errors)


def run_sweep(args: argparse.Namespace) -> int:
    cuda_wanted = not args.dry_run
    if args.dry_run:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    import torch
    import triton

    from plrd_kernels.backend import choose_backend
    from plrd_kernels.reference import lowrank_linear_reference

    cuda = torch.cuda.is_available() and (cuda_wanted or args.dry_run)
    if cuda_wanted and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (CPU interpreter, tiny shapes)", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 is wrong under the interpreter
    from plrd_kernels import triton_ops

    kinds = set(args.kinds.split(","))
    cases = dry_cases() if args.dry_run else shapes.all_cases()
    cases = [c for c in cases if c.kind in kinds]
    timer = Timer(cuda)
    start = time.monotonic()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dry_run": args.dry_run,
        "peak_flops": shapes.PEAK_FLOPS,
        "peak_bytes_per_s": shapes.PEAK_BYTES_PER_S,
        "compile_mode": "max-autotune" if cuda else "backend=eager (dry run)",
    }
    if cuda:
        meta["measured"] = measure_peaks(torch)
        print(f"measured peaks: {meta['measured']}", flush=True)
    print(f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']}", flush=True)

    def dense_fn(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    rows: list[dict] = []
    skipped: list[str] = []
    targets = sorted(
        (c for c in cases if c.kind == "target"),
        key=lambda c: COMPILE_RANK_ORDER.index(c.r) if c.r in COMPILE_RANK_ORDER else len(cases),
    )
    with_compile = set(targets[: args.compile_cases])
    compile_skipped: list[str] = []
    for case in cases:
        elapsed = time.monotonic() - start
        if elapsed > args.budget:
            skipped.append(case.label)
            continue
        fns: dict[str, Callable] = {
            "fused": triton_ops.lowrank_linear_triton,
            "torch": lowrank_linear_reference,
            "dense": dense_fn,
        }
        if case in with_compile and cuda and args.budget - elapsed < COMPILE_RESERVE_S:
            compile_skipped.append(case.label)
        elif case in with_compile:
            torch._dynamo.reset()
            kwargs = {"mode": "max-autotune"} if cuda else {"backend": "eager"}
            compiled = torch.compile(lowrank_linear_reference, **kwargs)
            if cuda:
                compiled = _with_cudagraph_step(compiled, torch)
            fns["compile"] = compiled
        t = make_inputs(torch, case, device, dtype)
        auto = choose_backend_for(choose_backend, case, t)
        for backward in (False, True) if case.kind != "decode" else (False,):
            out = bench_case(torch, case, backward, fns, timer, t)
            try:
                err = fused_error(torch, fns["fused"], lowrank_linear_reference, t, backward)
            except Exception as exc:
                err = math.nan
                out["errors"].setdefault("fused", f"check: {type(exc).__name__}: {exc}"[:200])
            rows.extend(result_rows(case, backward, out, auto, err))
            print(progress_line(case, backward, out["ms"]), flush=True)
        del t
        if cuda:
            torch.cuda.empty_cache()
    meta["seconds"] = round(time.monotonic() - start, 1)
    meta["skipped"] = skipped
    meta["compile_cases"] = [c.label for c in cases if c in with_compile]
    meta["compile_skipped"] = compile_skipped
    meta["note"] = args.note
    write_results(args.out, meta, rows)
    print()
    if args.note:
        print(args.note)
    print(f"{meta['device']} · {meta['dtype']} · {meta['seconds']} s · ×peer = peer ms / fused ms")
    print(summary_table(rows))
    if skipped:
        print(f"\nbudget of {args.budget:.0f} s spent: skipped {len(skipped)} cases: "
              + ", ".join(skipped))  # fmt: skip
    print(f"torch.compile ({meta['compile_mode']}) peer measured on "
          f"{', '.join(meta['compile_cases']) or 'no case'} only: each compile takes tens of "
          "seconds")  # fmt: skip
    if compile_skipped:
        print(f"budget too short for the compile peer on: {', '.join(compile_skipped)}")
    return 0


def _with_cudagraph_step(fn: Callable, torch) -> Callable:
    """max-autotune captures CUDA graphs: mark each benchmark iteration as a new step."""

    def call(*args):
        return fn(*args)

    call.mark_step = torch.compiler.cudagraph_mark_step_begin
    return call


def choose_backend_for(choose_backend: Callable, case: Case, t: dict) -> str:
    """What ``PLRD_BACKEND=auto`` picks for this case on this device."""
    saved = os.environ.pop("PLRD_BACKEND", None)
    try:
        return choose_backend(t["x"], t["down"], t["up"])
    finally:
        if saved is not None:
            os.environ["PLRD_BACKEND"] = saved


def result_rows(case: Case, backward: bool, out: dict, auto: str, err: float) -> list[dict]:
    mode = "fwd+bwd" if backward else "fwd"
    floor = shapes.floor_seconds(case, backward)
    rows = []
    for provider, ms in out["ms"].items():
        is_dense = provider == "dense"
        f = shapes.dense_flops(case, backward) if is_dense else shapes.flops(case, backward)
        b = shapes.dense_bytes(case, backward) if is_dense else shapes.bytes_moved(case, backward)
        sec = ms * 1e-3
        rows.append(
            {
                "kind": case.kind, "m": case.m, "k": case.k, "n": case.n, "r": case.r,
                "mode": mode, "provider": provider, "ms": ms,
                "tflops": f / sec / 1e12, "gb_s": b / sec / 1e9,
                "pct_roofline": math.nan if is_dense else 100.0 * floor / sec,
                "floor_us": floor * 1e6, "auto": auto,
                "rel_err": err if provider == "fused" else math.nan,
                "error": out["errors"].get(provider, ""),
            }
        )  # fmt: skip
    return rows


def progress_line(case: Case, backward: bool, ms: dict) -> str:
    cells = " ".join(f"{p}={v:.4g}ms" for p, v in ms.items())
    return f"{case.kind:8s} {case.label:28s} {'fwd+bwd' if backward else 'fwd':7s} {cells}"


def _ratio(rows_by_provider: dict, peer: str) -> str:
    fused = rows_by_provider.get("fused", {}).get("ms", math.nan)
    peer_ms = rows_by_provider.get(peer, {}).get("ms", math.nan)
    ratio = peer_ms / fused
    return "-" if math.isnan(ratio) else f"{ratio:.2f}"


def summary_table(rows: list[dict]) -> str:
    """One line per case and mode; ×peer = peer time / fused time (> 1: fused is faster);
    rel err: the fused result against fp32 torch ("!" past MAX_REL_ERR); auto: what
    ``PLRD_BACKEND=auto`` picks, "ok" when that is the faster of fused and torch."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row["kind"], row["m"], row["k"], row["n"], row["r"], row["mode"])
        groups.setdefault(key, {})[row["provider"]] = row
    header = (
        f"{'case':34s} {'mode':7s} {'fused ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} "
        f"{'%roof':>6s} {'×torch':>7s} {'×compile':>8s} {'×dense':>7s} {'rel err':>8s}  auto"
    )
    lines = [header, "-" * len(header)]
    for (kind, m, k, n, r, mode), by in groups.items():
        fused = by.get("fused")
        if fused is None:
            continue
        torch_ms = by.get("torch", {}).get("ms", math.nan)
        faster = "triton" if fused["ms"] <= torch_ms else "torch"
        verdict = "" if math.isnan(torch_ms) else (" ok" if fused["auto"] == faster else " MISS")
        lines.append(
            f"{kind + f' M{m} K{k} N{n} R{r}':34s} {mode:7s} {fused['ms']:9.4f} "
            f"{fused['tflops']:8.1f} {fused['gb_s']:7.0f} {fused['pct_roofline']:6.1f} "
            f"{_ratio(by, 'torch'):>7s} {_ratio(by, 'compile'):>8s} {_ratio(by, 'dense'):>7s}"
            f" {fused['rel_err']:8.1e}{'!' if not fused['rel_err'] < MAX_REL_ERR else ' '}"
            f" {fused['auto']}{verdict}"
        )
    return "\n".join(lines)


def write_results(out: str | None, meta: dict, rows: list[dict]) -> None:
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep.json", "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1, default=str)
    if rows:
        with open(folder / "sweep.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    try:
        plot(folder / "sweep.png", meta, rows)
    except ImportError:
        pass
    print(f"results written to {folder}/sweep.json, sweep.csv", flush=True)


def plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Bars: the peers' time over the fused time per case (> 1: fused is faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = {
        (r["kind"], r["m"], r["k"], r["n"], r["r"], r["mode"]): r["ms"]
        for r in rows
        if r["provider"] == "fused"
    }
    keys = list(fused)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(keys)), 4.5))
    width = 0.27
    for i, peer in enumerate(("torch", "compile", "dense")):
        peer_ms = {
            (r["kind"], r["m"], r["k"], r["n"], r["r"], r["mode"]): r["ms"]
            for r in rows
            if r["provider"] == peer
        }
        values = [peer_ms.get(k, math.nan) / fused[k] for k in keys]
        ax.bar([j + (i - 1) * width for j in range(len(keys))], values, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"M{k[1]} K{k[2]} N{k[3]} R{k[4]} {k[5]}" for k in keys], rotation=90)
    ax.set_ylabel("peer time / fused time")
    ax.set_title(f"plrd fused low-rank op, {meta['device']}, {meta['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.roofline_table:
        print(shapes.roofline_table())
        return 0
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
