"""Kernel sweep: the fused low-rank op against its peers, one stage at a time.

Providers: ``fused`` (the Triton kernels, autotuned), ``torch`` (the eager two-GEMM chain),
``compile`` (the same chain under ``torch.compile``, max-autotune's kernel choice) and
``dense`` (the ``nn.Linear`` the factors replace). bf16 on a GPU. Each (case, mode,
provider) is appended to ``sweep.jsonl`` / ``sweep.csv`` the moment it is measured
(``sweep_results.py``), so a stage cut short keeps what it finished.

    python benchmarks/sweep.py --stage target --out DIR     # M 8192, K = N = 4096
    python benchmarks/sweep.py --stage decode --out DIR     # M 1 and 16
    python benchmarks/sweep.py --stage target --dry-run     # CPU interpreter, tiny shapes
    python benchmarks/sweep.py --summarize --out DIR        # table + goals -> summary.md
    python benchmarks/sweep.py --roofline-table

Timing (GPU): ``triton.testing.do_bench_cudagraph`` (the call replayed in a CUDA graph, so
host overhead is out for every provider alike; 10 samples: median, p10, p90); a provider
that cannot be captured falls back to CUDA events over many runs (``timer`` column). The
compiled peer uses ``mode="max-autotune-no-cudagraphs"``: max-autotune's GEMM choice, with
the CUDA graph supplied by the timer as for the others (max-autotune's own graphs cannot be
captured inside another). The first call of each provider (where the fused op autotunes)
is not timed; the fused op's first-call result is checked against float64 (``rel_err``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import shapes  # noqa: E402
import sweep_results  # noqa: E402
from shapes import Case  # noqa: E402

STAGES = ("target", "decode", "training")
BASE_PROVIDERS = ("fused", "torch", "dense")
REP_MS = 40
"""Timed milliseconds per CUDA-graph sample batch (do_bench_cudagraph's ``rep``)."""
QUANTILES = [0.5, 0.1, 0.9]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, help="which cases to measure")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU interpreter")
    parser.add_argument(
        "--deadline", type=float, default=math.inf, help="seconds; start nothing after this"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile peer")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="results folder")
    parser.add_argument("--summarize", action="store_true", help="print/write the summary")
    parser.add_argument("--note", default="", help="a line for the summary")
    parser.add_argument("--roofline-table", action="store_true", help="print it and exit")
    return parser.parse_args(argv)


def dry_cases(kind: str) -> list[Case]:
    """Tiny stand-ins for the interpreter (each call there takes tens of milliseconds)."""
    return {
        "target": [Case("target", 33, 40, 24, 17)],
        "decode": [Case("decode", 1, 130, 40, 8)],
        "training": [Case("training", 64, 64, 48, 4)],
    }[kind]


class Timer:
    """``stats(call) -> ([median, p10, p90] ms, timer name)``."""

    def __init__(self, torch, cuda: bool) -> None:
        self.torch, self.cuda = torch, cuda

    def stats(self, call: Callable[[], object]) -> tuple[list[float], str]:
        if not self.cuda:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                call()
                times.append(1e3 * (time.perf_counter() - start))
            times.sort()
            return [times[1], times[0], times[2]], "cpu"
        import triton.testing

        try:
            ms = triton.testing.do_bench_cudagraph(call, rep=REP_MS, quantiles=QUANTILES)
            return [float(v) for v in ms], "cudagraph"
        except Exception as exc:  # not capturable: CUDA events, L2 flushed between runs
            print(f"  cudagraph timing failed ({type(exc).__name__}); CUDA events", flush=True)
            self.torch.cuda.synchronize()
            ms = triton.testing.do_bench(call, warmup=10, rep=2 * REP_MS, quantiles=QUANTILES)
            return [float(v) for v in ms], "events"


def measure_peaks(torch) -> dict[str, float]:
    """Quick bf16 GEMM FLOP/s and copy bandwidth on this GPU (a check on shapes.py)."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=50, return_mode="median")
    src = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return {
        "gemm_tflops": round(2 * 8192**3 / (gemm_ms * 1e-3) / 1e12, 1),
        "copy_tb_s": round(2 * src.numel() / (copy_ms * 1e-3) / 1e12, 2),
    }


def make_inputs(torch, case: Case, device: str, dtype) -> dict:
    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_()

    return {
        "x": rand(case.m, case.k),
        "down": rand(case.r, case.k, scale=case.k**-0.5),
        "up": rand(case.n, case.r, scale=case.r**-0.5),
        "bias": rand(case.n),
        "weight": rand(case.n, case.k, scale=case.k**-0.5),
        "grad_y": rand(case.m, case.n).detach(),
    }


def make_call(torch, fn: Callable, inputs: list, backward: bool, grad_y) -> Callable:
    """One forward (no autograd) or forward + all gradients (``autograd.grad``: nothing
    accumulates, so the call can be replayed)."""
    if not backward:

        def forward():
            with torch.no_grad():
                return fn(*inputs)

        return forward

    def forward_backward():
        y = fn(*inputs)
        return y, torch.autograd.grad(y, inputs, grad_y)

    return forward_backward


def first_call_error(torch, out, t: dict, backward: bool) -> float:
    """Worst relative error of y (and every gradient) against float64."""
    from plrd_kernels.reference import lowrank_linear_grads_reference, relative_error

    y, grads = out if backward else (out, ())
    names = ("x", "down", "up", "bias")
    y_ref, grads_ref = lowrank_linear_grads_reference(*(t[n] for n in names), t["grad_y"])
    errors = [relative_error(y, y_ref)]
    errors += [relative_error(g, r) for g, r in zip(grads, grads_ref, strict=False)]
    return max(errors)


def providers(torch, cuda: bool, with_compile: bool) -> dict[str, Callable]:
    from plrd_kernels.reference import lowrank_linear_reference
    from plrd_kernels.triton_ops import lowrank_linear_triton

    fns = {
        "fused": lowrank_linear_triton,
        "torch": lowrank_linear_reference,
        "dense": lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias),
    }
    if with_compile:
        options = {"mode": "max-autotune-no-cudagraphs"} if cuda else {"backend": "eager"}
        fns["compile"] = torch.compile(lowrank_linear_reference, dynamic=False, **options)
    return fns


def plan(kind: str, cases: list[Case], with_compile: bool) -> list[tuple[Case, str, str]]:
    """(case, mode, provider) in the order measured: every case with fused, eager and dense
    first, the compiled peer (tens of seconds of compiling each) after all of them."""
    modes = ("fwd",) if kind == "decode" else ("fwd", "fwd+bwd")
    steps = [(c, mode, p) for c in cases for mode in modes for p in BASE_PROVIDERS]
    if with_compile and kind != "decode":
        steps += [(c, mode, "compile") for c in cases for mode in modes]
    return steps


def auto_choice(case_inputs: dict) -> str:
    """What ``PLRD_BACKEND=auto`` picks for these tensors."""
    from plrd_kernels.backend import choose_backend

    saved = os.environ.pop("PLRD_BACKEND", None)
    try:
        return choose_backend(case_inputs["x"], case_inputs["down"], case_inputs["up"])
    finally:
        if saved is not None:
            os.environ["PLRD_BACKEND"] = saved


def measure(torch, fn: Callable, case: Case, mode: str, provider: str, t: dict, timer) -> dict:
    """One line of results: time (median, spread), throughput, roofline %, first-call error,
    and for the fused op the configs its first call tuned (``tuned``)."""
    from plrd_kernels import tuning

    backward = mode == "fwd+bwd"
    dense = provider == "dense"
    inputs = (
        [t["x"], t["weight"], t["bias"]] if dense else [t[n] for n in ("x", "down", "up", "bias")]
    )
    call = make_call(torch, fn, inputs, backward, t["grad_y"])
    record: dict = {"kind": case.kind, "m": case.m, "k": case.k, "n": case.n, "r": case.r,
                    "mode": mode, "provider": provider, "error": ""}  # fmt: skip
    try:
        tuned_before = tuning.tuned_choices() if provider == "fused" else set()
        first = call()  # autotunes / compiles; the fused op's result is checked
        if provider == "fused":
            record["tuned"] = sorted(tuning.tuned_choices() - tuned_before)
        record["rel_err"] = (
            first_call_error(torch, first, t, backward) if provider == "fused" else math.nan
        )
        del first
        (ms, p10, p90), record["timer"] = timer.stats(call)
    except Exception as exc:  # one provider failing must not end the stage
        record["error"] = (
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        )
        ms = p10 = p90 = math.nan
    flops = shapes.dense_flops(case, backward) if dense else shapes.flops(case, backward)
    moved = shapes.dense_bytes(case, backward) if dense else shapes.bytes_moved(case, backward)
    floor = max(flops / shapes.PEAK_FLOPS, moved / shapes.PEAK_BYTES_PER_S)
    sec = ms * 1e-3
    record.update(
        ms=ms, ms_p10=p10, ms_p90=p90, tflops=flops / sec / 1e12, gb_s=moved / sec / 1e9,
        floor_us=floor * 1e6, pct_roofline=100.0 * floor / sec,
    )  # fmt: skip
    return record


def run_stage(args: argparse.Namespace) -> int:
    start = time.monotonic()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    import torch
    import triton

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: use --dry-run (CPU interpreter, tiny shapes)", file=sys.stderr)
        return 2
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    writer = sweep_results.ResultsWriter(args.out)
    meta = {
        "stage": args.stage,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "dry_run": args.dry_run, "peak_flops": shapes.PEAK_FLOPS,
        "peak_bytes_per_s": shapes.PEAK_BYTES_PER_S,
    }  # fmt: skip
    if cuda and args.stage == "target":
        meta["measured"] = measure_peaks(torch)
    writer.meta(meta)
    print(f"[{args.stage}] {meta['device']} · torch {meta['torch']} · triton {meta['triton']}"
          f" · {meta.get('measured', '')}", flush=True)  # fmt: skip
    cases = dry_cases(args.stage) if args.dry_run else shapes.cases(args.stage)
    fns = providers(torch, cuda, with_compile=not args.no_compile)
    timer, inputs = Timer(torch, cuda), {}
    for case, mode, provider in plan(args.stage, cases, not args.no_compile):
        what = f"{case.kind} {case.label} {mode} {provider}"
        if time.monotonic() - start > args.deadline:
            writer.skip({"stage": args.stage, "what": what})
            continue
        if case not in inputs:
            inputs = {case: make_inputs(torch, case, device, dtype)}  # one case's tensors at a time
        t = inputs[case]
        record = measure(torch, fns[provider], case, mode, provider, t, timer)
        record.update(stage=args.stage, auto=auto_choice(t))
        writer.case(record)
        print(f"  {what}: {record['ms']:.4g} ms ({record['timer'] if 'timer' in record else '-'})"
              f"{' ' + record['error'] if record['error'] else ''}", flush=True)  # fmt: skip
    print(f"[{args.stage}] done in {time.monotonic() - start:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.roofline_table:
        print(shapes.roofline_table())
        return 0
    if args.summarize:
        if not args.out:
            print("--summarize needs --out (or $OUT)", file=sys.stderr)
            return 2
        print(sweep_results.summarize(args.out, args.note))
        return 0
    if args.stage is None:
        print("give --stage, --summarize or --roofline-table", file=sys.stderr)
        return 2
    return run_stage(args)


if __name__ == "__main__":
    sys.exit(main())
