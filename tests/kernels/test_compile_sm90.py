"""Every tier's fallback config compiles for sm_90 (H100/H200) and fits its shared memory.

Runs without a GPU: Triton compiles to a cubin with the ``ptxas`` its wheel bundles. A
subprocess, because this test session decorates the kernels for the interpreter.
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


@pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build bundles no ptxas")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the real launches are tested")
def test_fallback_configs_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "plrd_kernels.compile_report", "--last-only", "--check"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| chain")]
    assert len(rows) == 10  # 3 bf16 tiers + 2 fp32 tiers, forward and backward
    assert all(line.rstrip().endswith("| yes |") for line in rows)
