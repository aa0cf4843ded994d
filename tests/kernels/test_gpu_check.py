"""``GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh``: the GPU check's pipeline on the CPU.

The dry run goes through the same stages (target and decode sweeps on tiny shapes under
the interpreter, the correctness tests, the FSDP2 test) and writes the same files. Each
sweep measurement must be on disk the moment it is finished: a check that runs out of time
(or is killed) keeps what it measured.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CASE_FIELDS = {"stage", "kind", "m", "k", "n", "r", "mode", "provider", "ms", "ms_p10",
               "ms_p90", "timer", "pct_roofline", "rel_err", "auto", "error"}  # fmt: skip

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a dry run is for machines without a GPU"
)


def _start(out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable)
    return subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _case_lines(out: Path) -> list[dict]:
    path = out / "sweep.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "case"]


def _wait_for_cases(job: subprocess.Popen, out: Path, count: int, limit_s: float = 120):
    deadline = time.monotonic() + limit_s
    while len(_case_lines(out)) < count:
        assert job.poll() is None, f"the check ended before {count} cases were written"
        assert time.monotonic() < deadline, "no sweep case written in time"
        time.sleep(0.2)


def test_killed_midway_keeps_the_finished_cases(tmp_path):
    job = _start(tmp_path)
    try:
        _wait_for_cases(job, tmp_path, count=2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate(timeout=60)
    cases = _case_lines(tmp_path)
    assert len(cases) >= 2
    assert all(CASE_FIELDS <= set(case) for case in cases)
    assert cases[0]["stage"] == "target" and cases[0]["provider"] == "fused"
    assert cases[0]["ms"] > 0 and cases[0]["rel_err"] < 1e-5 and not cases[0]["error"]
    with open(tmp_path / "sweep.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(cases)
    assert [(r["provider"], r["mode"]) for r in rows] == [(c["provider"], c["mode"]) for c in cases]
    assert not (tmp_path / "summary.md").exists()  # it really was cut short


def test_dry_run_goes_through_every_stage(tmp_path):
    job = _start(tmp_path)
    _wait_for_cases(job, tmp_path, count=1)  # written while the check still runs
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-4000:]
    cases = _case_lines(tmp_path)
    stages = {(c["stage"], c["mode"], c["provider"]) for c in cases}
    for provider in ("fused", "torch", "dense", "compile"):
        assert ("target", "fwd", provider) in stages and ("target", "fwd+bwd", provider) in stages
    assert ("decode", "fwd", "fused") in stages
    assert all(not c["error"] and c["ms"] > 0 for c in cases)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| target M33 K40 N24 R17 | fwd |" in summary and "Goals:" in summary
    assert "correctness tests: ok" in output and "FSDP2 on GPU: skipped" in output
    for name in ("gpu_check.log", "gpu_tests.xml", "gpu_fsdp.xml", "sweep.csv"):
        assert (tmp_path / name).exists(), name
