"""Compile every kernel config for a GPU architecture without a GPU; report resources.

    python -m plrd_kernels.compile_report            # all configs, sm_90 (H100/H200)
    python -m plrd_kernels.compile_report --last-only --check

Triton compiles to a cubin on any machine (its wheel bundles ``ptxas``); ``cuobjdump``
(also bundled) reads the registers and stack (spill) bytes back. Each kernel is compiled
with the argument specialisation a real call gets (unit strides as constants, 16-byte
aligned pointers), forward and backward stride patterns for the chain. ``--check`` fails
if the last config of any tier (the one ``PLRD_AUTOTUNE=0`` uses and the autotuner can
always fall back on) does not compile or does not fit in shared memory.

Must run without ``TRITON_INTERPRET=1`` (it needs compiled, not interpreted, kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from plrd_kernels import chain, grads, tuning

SHARED_LIMIT = {90: 232_448}
"""Largest dynamic shared memory one program may use, bytes, by compute capability."""

_CHAIN_UNIT_STRIDES = {
    "forward": ["stride_xk", "stride_ak", "stride_br", "stride_bias", "stride_yn", "stride_tr"],
    "backward": ["stride_xk", "stride_ar", "stride_bn", "stride_bias", "stride_yn", "stride_tr"],
}
_CHAIN_ALIGNED = [
    "x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "acc_ptr", "t_ptr", "K", "N", "M_INNER",
    "stride_x1", "stride_ak", "stride_ar", "stride_br", "stride_bn", "stride_ym", "stride_tm",
]  # fmt: skip
_REDUCE_ALIGNED = [
    "l_ptr", "q_ptr", "c_ptr", "s_ptr", "P", "Q", "L_INNER", "Q_INNER",
    "stride_l1", "stride_q1", "stride_cs", "stride_cp", "stride_ss",
]  # fmt: skip
_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(fn: Any, pointers: dict[str, str], consts: dict, aligned: list[str], cfg, arch: int):
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


def chain_entry(cfg, rp: int, dtype: str, direction: str, arch: int = 90) -> dict:
    ptr = _TYPES[dtype]
    pointers = {n: ptr for n in ("x_ptr", "a_ptr", "b_ptr", "bias_ptr", "y_ptr", "t_ptr")}
    pointers["acc_ptr"] = "*fp32"
    consts = dict(
        HAS_BIAS=direction == "forward", STORE_Y=True, STORE_T=True, LOAD_ACC=False, RP=rp,
        ALLOW_TF32=dtype != "fp32", stride_x0=0, **cfg.kwargs,
    )  # fmt: skip
    consts.update({name: 1 for name in _CHAIN_UNIT_STRIDES[direction]})
    fn = chain._chain_kernel
    return _entry("chain", direction, dtype, rp, cfg, arch, fn, pointers, consts, _CHAIN_ALIGNED)


def reduce_entry(cfg, dtype: str, arch: int = 90) -> dict:
    ptr = _TYPES[dtype]
    pointers = {"l_ptr": ptr, "q_ptr": ptr, "c_ptr": "*fp32", "s_ptr": "*fp32"}
    consts = dict(
        WITH_SUM=True, ALLOW_TF32=dtype != "fp32", stride_lp=1, stride_qq=1, stride_cq=1,
        stride_sp=1, stride_l0=0, stride_q0=0, **cfg.kwargs,
    )  # fmt: skip
    fn = grads._reduce_rows_kernel
    return _entry(
        "reduce_rows", "backward", dtype, 0, cfg, arch, fn, pointers, consts, _REDUCE_ALIGNED
    )


def _entry(name, direction, dtype, rp, cfg, arch, fn, pointers, consts, aligned) -> dict:
    blocks = "x".join(str(v) for v in cfg.kwargs.values())
    entry = {
        "kernel": name, "direction": direction, "dtype": dtype, "rp": rp,
        "config": f"{blocks} w{cfg.num_warps} s{cfg.num_stages}",
    }  # fmt: skip
    try:
        kernel = _compile(fn, pointers, consts, aligned, cfg, arch)
    except Exception as exc:  # report, do not stop: the caller decides what must compile
        return {**entry, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    shared = int(kernel.metadata.shared)
    registers, stack = _resources(kernel)
    fits = shared <= SHARED_LIMIT.get(arch, 232_448)
    return {**entry, "shared": shared, "registers": registers, "stack": stack, "fits": fits}


def report(last_only: bool = False, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> list[dict]:
    """One entry per (kernel, direction, dtype, padded rank, config)."""
    entries = []
    for dtype in dtypes:
        for bound, configs in chain.TIERS.items():
            if dtype == "fp32" and bound > chain.MAX_CHUNK[4]:
                continue  # fp32 ranks are chunked at 256
            for cfg in configs[-1:] if last_only else configs:
                for direction in ("forward", "backward"):
                    entry = chain_entry(cfg, bound, dtype, direction)
                    entries.append({**entry, "last": cfg is configs[-1]})
        for cfg in grads._CONFIGS[-1:] if last_only else grads._CONFIGS:
            entries.append({**reduce_entry(cfg, dtype), "last": cfg is grads._CONFIGS[-1]})
    return entries


def last_configs_fit(entries: list[dict]) -> bool:
    """Every tier's last config compiled and fits in shared memory."""
    return all(e.get("fits") for e in entries if e["last"])


def format_table(entries: list[dict]) -> str:
    lines = ["| kernel | dir | dtype | RP | config | shared KiB | regs | stack B | fits |"]
    lines.append("|---|---|---|---:|---|---:|---:|---:|---|")
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['kernel']} | {e['direction']} | {e['dtype']} | {e['rp']} | "
                         f"{e['config']} | error: {e['error']} | | | no |")  # fmt: skip
            continue
        lines.append(
            f"| {e['kernel']} | {e['direction']} | {e['dtype']} | {e['rp'] or '-'} | "
            f"{e['config']} | {e['shared'] / 1024:.0f} | {e['registers']} | {e['stack']} | "
            f"{'yes' if e['fits'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile the kernel configs for sm_90")
    parser.add_argument("--last-only", action="store_true", help="each tier's last config")
    parser.add_argument("--check", action="store_true", help="fail if a last config misfits")
    args = parser.parse_args(argv)
    if tuning.INTERPRET:
        print("unset TRITON_INTERPRET: compiled kernels are needed", file=sys.stderr)
        return 2
    entries = report(last_only=args.last_only)
    print(format_table(entries))
    if args.check and not last_configs_fit(entries):
        print("a tier's last config does not compile or fit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
