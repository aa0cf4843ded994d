"""Compile every kernel config for a GPU architecture without a GPU; report resources.

    python benchmarks/compile_report.py                      # all configs, sm_90 (H100/H200)
    python benchmarks/compile_report.py --last-only --check  # each list's fallback config
    python benchmarks/compile_report.py --unaligned          # as a call with odd sizes gets

Triton compiles to a cubin on any machine (its wheel bundles ``ptxas``); ``cuobjdump`` (also
bundled) reads the registers and stack (spill) bytes back. A kernel's code depends on the
specialisation Triton gives a call: integer arguments equal to 1 become constants, and
pointers, sizes and strides divisible by 16 are marked so (vectorised 16-byte accesses).
Each row says which it was compiled for: ``aligned`` (every pointer 16-byte aligned and the
sizes and strides listed in ``ALIGNED_ARGS`` multiples of 16: the target shapes, K = N =
4096) or ``unaligned`` (no divisibility known: e.g. K = 37), plus the unit strides that
were constants (``UNIT_STRIDES``). Figures for one specialisation say nothing about another.
``--check`` fails if the last config of any list (the one ``PLRD_AUTOTUNE=0`` uses and the
autotuner can always fall back on) does not compile or does not fit in shared memory.

Must run without ``TRITON_INTERPRET=1`` (it needs compiled, not interpreted, kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from plrd_kernels import chain, decode, grads, tuning  # noqa: E402

SHARED_LIMIT = {90: 232_448}
"""Largest dynamic shared memory one program may use, bytes, by compute capability."""

UNIT_STRIDES = {
    ("chain", "forward"): ["stride_xk", "stride_ak", "stride_br", "stride_bias", "stride_yn",
                           "stride_tr"],
    ("chain", "backward"): ["stride_xk", "stride_ar", "stride_bn", "stride_bias", "stride_yn",
                            "stride_tr"],
    ("shrink", "forward"): ["stride_xk", "stride_ak"],
    ("shrink", "backward"): ["stride_xk", "stride_ar"],
    ("expand", "forward"): ["stride_br", "stride_bias", "stride_yn", "stride_tr"],
    ("expand", "backward"): ["stride_bn", "stride_bias", "stride_yn", "stride_tr"],
    ("reduce_rows", "backward"): ["stride_lp", "stride_qq", "stride_cq", "stride_sp"],
}  # fmt: skip
"""Strides that are 1 in a real call (forward: A = downᵀ, B = upᵀ; backward: A = up,
B = down), compiled as constants."""

ALIGNED_ARGS = {
    "chain": ["x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "acc_ptr", "t_ptr", "K", "N",
              "M_INNER", "stride_x1", "stride_ak", "stride_ar", "stride_br", "stride_bn",
              "stride_ym", "stride_tm"],
    "shrink": ["x_ptr", "a_ptr", "p_ptr", "K", "M_INNER", "K_SPLIT", "stride_x1", "stride_ak",
               "stride_ar", "stride_ps", "stride_pm"],
    "expand": ["p_ptr", "b_ptr", "bias_ptr", "y_ptr", "t_ptr", "N", "stride_ps", "stride_pm",
               "stride_br", "stride_bn", "stride_ym", "stride_tm"],
    "reduce_rows": ["l_ptr", "q_ptr", "c_ptr", "s_ptr", "P", "Q", "L_INNER", "Q_INNER",
                    "stride_l1", "stride_q1", "stride_cs", "stride_cp", "stride_ss"],
}  # fmt: skip
"""Arguments marked divisible by 16 in the aligned specialisation (at the target shapes)."""

_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(fn: Any, pointers: dict, consts: dict, aligned: list[str], cfg: Any, arch: int):
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointers)
    signature.update({name: "constexpr" for name in consts})
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name in aligned
        if name not in consts
    }
    source = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _resources(kernel: Any) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread from the cubin, or Nones without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    match = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


class Spec:
    """What one entry is compiled for: kernel, direction, dtype, padded rank, alignment."""

    def __init__(self, kernel: str, direction: str, dtype: str, rp: int, aligned: bool) -> None:
        self.kernel, self.direction, self.dtype, self.rp = kernel, direction, dtype, rp
        self.aligned = aligned

    def consts(self, **extra: Any) -> dict:
        unit = UNIT_STRIDES[(self.kernel, self.direction)]
        return {**{name: 1 for name in unit}, **extra}

    def aligned_args(self) -> list[str]:
        return ALIGNED_ARGS[self.kernel] if self.aligned else []


def chain_entry(cfg: Any, spec: Spec, arch: int = 90) -> dict:
    ptr = _TYPES[spec.dtype]
    pointers = {n: ptr for n in ("x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "t_ptr")}
    pointers["acc_ptr"] = "*fp32"
    consts = spec.consts(
        HAS_BIAS=spec.direction == "forward", STORE_Y=True, STORE_T=True, LOAD_ACC=False,
        RP=spec.rp, ALLOW_TF32=spec.dtype != "fp32", stride_x0=0, **cfg.kwargs,
    )  # fmt: skip
    return _entry(spec, cfg, arch, chain._chain_kernel, pointers, consts)


def shrink_entry(cfg: Any, spec: Spec, arch: int = 90) -> dict:
    ptr = _TYPES[spec.dtype]
    pointers = {"x_ptr": ptr, "a_ptr": ptr, "p_ptr": "*fp32"}
    consts = spec.consts(
        RP=spec.rp, ALLOW_TF32=spec.dtype != "fp32", BLOCK_M=decode.MAX_ROWS, stride_x0=0,
        **cfg.kwargs,
    )  # fmt: skip
    return _entry(spec, cfg, arch, decode._shrink_kernel, pointers, consts)


def expand_entry(cfg: Any, spec: Spec, arch: int = 90) -> dict:
    ptr = _TYPES[spec.dtype]
    pointers = {n: ptr for n in ("b_ptr", "bias_ptr", "y_ptr", "t_ptr")}
    pointers["p_ptr"] = "*fp32"
    consts = spec.consts(
        HAS_BIAS=spec.direction == "forward", STORE_T=True, RP=spec.rp,
        ALLOW_TF32=spec.dtype != "fp32", BLOCK_M=decode.MAX_ROWS, **cfg.kwargs,
    )  # fmt: skip
    return _entry(spec, cfg, arch, decode._expand_kernel, pointers, consts)


def reduce_entry(cfg: Any, spec: Spec, arch: int = 90) -> dict:
    ptr = _TYPES[spec.dtype]
    pointers = {"l_ptr": ptr, "q_ptr": ptr, "c_ptr": "*fp32", "s_ptr": "*fp32"}
    consts = spec.consts(
        WITH_SUM=True, ALLOW_TF32=spec.dtype != "fp32", stride_l0=0, stride_q0=0, **cfg.kwargs
    )
    return _entry(spec, cfg, arch, grads._reduce_rows_kernel, pointers, consts)


def _entry(spec: Spec, cfg: Any, arch: int, fn: Any, pointers: dict, consts: dict) -> dict:
    blocks = "x".join(str(v) for v in cfg.kwargs.values())
    entry = {
        "kernel": spec.kernel, "direction": spec.direction, "dtype": spec.dtype, "rp": spec.rp,
        "config": f"{blocks} w{cfg.num_warps} s{cfg.num_stages}",
        "spec": "aligned" if spec.aligned else "unaligned",
    }  # fmt: skip
    try:
        kernel = _compile(fn, pointers, consts, spec.aligned_args(), cfg, arch)
    except Exception as exc:  # report, do not stop: the caller decides what must compile
        return {**entry, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    shared = int(kernel.metadata.shared)
    registers, stack = _resources(kernel)
    fits = shared <= SHARED_LIMIT.get(arch, 232_448)
    return {**entry, "shared": shared, "registers": registers, "stack": stack, "fits": fits}


def planned(dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[tuple[Any, Spec, list]]:
    """``(entry function, spec, config list)`` for every kernel, direction, dtype and tier
    (fp32 ranks are chunked at ``chain.MAX_CHUNK[4]``, so no fp32 tier above it)."""
    plan = []
    for dtype in dtypes:
        limit = chain.MAX_CHUNK[4 if dtype == "fp32" else 2]
        for bound, configs in chain.TIERS.items():
            if bound <= limit:
                for direction in ("forward", "backward"):
                    spec = Spec("chain", direction, dtype, bound, True)
                    plan.append((chain_entry, spec, configs))
        for kernel, entry, tiers in (
            ("shrink", shrink_entry, decode.SHRINK_TIERS),
            ("expand", expand_entry, decode.EXPAND_TIERS),
        ):
            for bound, configs in tiers.items():
                for direction in ("forward", "backward"):
                    spec = Spec(kernel, direction, dtype, min(bound, limit), True)
                    plan.append((entry, spec, configs))
        plan.append((reduce_entry, Spec("reduce_rows", "backward", dtype, 0, True), grads._CONFIGS))
    return plan


def report(
    last_only: bool = False,
    aligned: bool = True,
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    kernels: tuple[str, ...] = (),
) -> list[dict]:
    """One entry per planned (kernel, direction, dtype, padded rank) and config; ``last``
    marks each list's fallback config."""
    entries = []
    for entry_fn, spec, configs in planned(dtypes):
        if kernels and spec.kernel not in kernels:
            continue
        spec.aligned = aligned
        for cfg in configs[-1:] if last_only else configs:
            entries.append({**entry_fn(cfg, spec), "last": cfg is configs[-1]})
    return entries


def last_configs_fit(entries: list[dict]) -> bool:
    """Every list's last config compiled and fits in shared memory."""
    return all(e.get("fits") for e in entries if e["last"])


def format_table(entries: list[dict]) -> str:
    lines = ["| kernel | dir | dtype | RP | config | spec | shared KiB | regs | stack B | fits |"]
    lines.append("|---|---|---|---:|---|---|---:|---:|---:|---|")
    for e in entries:
        head = (
            f"| {e['kernel']} | {e['direction']} | {e['dtype']} | {e['rp'] or '-'} | "
            f"{e['config']} | {e['spec']} |"
        )
        if "error" in e:
            lines.append(f"{head} error: {e['error']} | | | no |")
            continue
        lines.append(
            f"{head} {e['shared'] / 1024:.0f} | {e['registers']} | {e['stack']} | "
            f"{'yes' if e['fits'] else 'NO'} |"
        )
    return "\n".join(lines)


def specialisations() -> str:
    """The unit strides and aligned arguments each kernel is compiled with (for the notes)."""
    lines = ["Unit strides compiled as constants:"]
    lines += [f"- {k} {d}: {', '.join(names)}" for (k, d), names in UNIT_STRIDES.items()]
    lines.append("Divisible by 16 in the aligned specialisation:")
    lines += [f"- {k}: {', '.join(names)}" for k, names in ALIGNED_ARGS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile the kernel configs for sm_90")
    parser.add_argument("--last-only", action="store_true", help="each list's last config")
    parser.add_argument("--check", action="store_true", help="fail if a last config misfits")
    parser.add_argument("--unaligned", action="store_true", help="no divisibility by 16 known")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16,fp16,fp32")
    parser.add_argument("--kernels", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    if tuning.INTERPRET:
        print("unset TRITON_INTERPRET: compiled kernels are needed", file=sys.stderr)
        return 2
    dtypes = tuple(args.dtypes.split(","))
    kernels = tuple(k for k in args.kernels.split(",") if k)
    entries = report(args.last_only, not args.unaligned, dtypes, kernels)
    print(f"Triton {triton.__version__}, sm_90\n{specialisations()}\n")
    print(format_table(entries))
    if args.check and not last_configs_fit(entries):
        print("a list's last config does not compile or fit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
