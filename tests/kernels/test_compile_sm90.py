"""Every config list's fallback config compiles for sm_90 (H100/H200) and fits its shared
memory.

Runs without a GPU: Triton compiles to a cubin with the ``ptxas`` its wheel bundles. In
subprocesses (``benchmarks/compile_report.py``, one per dtype, run side by side), because
this session decorates the kernels for the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": 2, "fp32": 4}


def _expected_rows(element_size: int) -> dict[str, int]:
    """Rows the report must print for one dtype, by kernel: one per config list (its last
    config) and direction. The chain and the decode kernels have a list per rank tier;
    chain ranks are chunked at MAX_CHUNK[element size], so no chain tier above it is
    compiled (a decode tier is compiled at min(its bound, that size))."""
    from plrd_kernels import chain, decode

    tiers = sum(1 for bound in chain.TIERS if bound <= chain.MAX_CHUNK[element_size])
    return {
        "chain": 2 * tiers,
        "shrink": 2 * len(decode.SHRINK_TIERS),
        "expand": 2 * len(decode.EXPAND_TIERS),
        "reduce_rows": 1,
    }


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build bundles no ptxas")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the real launches are tested")
def test_fallback_configs_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "compile_report.py")
    jobs = {
        dtype: subprocess.Popen(
            [sys.executable, script, "--last-only", "--check", "--dtypes", dtype],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for dtype in DTYPES
    }
    for dtype, job in jobs.items():
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:] + err[-3000:]
        rows = [row for row in out.splitlines() if row.startswith("| ") and "| kernel |" not in row]
        counts = {kernel: 0 for kernel in _expected_rows(DTYPES[dtype])}
        for row in rows:
            counts[row.split("|")[1].strip()] += 1
        assert counts == _expected_rows(DTYPES[dtype]), dtype
        assert all(row.rstrip().endswith("| yes |") for row in rows)
        assert all(f"| {dtype} |" in row and "| aligned |" in row for row in rows)
