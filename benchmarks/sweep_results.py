"""Sweep results on disk, written the moment each is measured, and the summary read back.

Files in the results folder (``$OUT`` in the GPU check):

- ``sweep.jsonl``: one JSON object a line, appended and flushed as soon as it is known:
  ``{"type": "meta", ...}`` when a stage starts (device, versions, measured peaks),
  ``{"type": "case", ...}`` per (case, mode, provider) timing (``FIELDS``), and
  ``{"type": "skip", ...}`` for measurements a stage's deadline left out.
- ``sweep.csv``: the case lines again, one row each (header with the first), for tables.
- ``summary.md``: written by ``summarize`` at the end: the table and the goals' verdicts.

A run cut short (a stage's time limit, a kill) leaves every finished line intact; the
summary can be rebuilt from ``sweep.jsonl`` at any time (``sweep.py --summarize``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

FIELDS = [
    "stage", "kind", "m", "k", "n", "r", "mode", "provider", "ms", "ms_p10", "ms_p90",
    "timer", "tflops", "gb_s", "floor_us", "pct_roofline", "rel_err", "auto", "error", "tuned",
]  # fmt: skip
"""Columns of a case line. ms: median; ms_p10/ms_p90: the spread of the timer's samples;
pct_roofline: the roofline floor (shapes.py) over ms, in %; rel_err: the fused op's first
call (the one that autotunes) against float64, forward and every gradient (worst); tuned:
the configs that first call chose (``kernel key: config``), empty where nothing tuned."""

GOAL_FWD_OVER_EAGER = 1.15
GOAL_FWD_OVER_COMPILE = 1.0
GOAL_DECODE_OVER_EAGER = 1.0
MAX_REL_ERR = 2e-2
"""A fused result further than this from float64 is flagged "!" (bf16 is ~4e-3)."""


class ResultsWriter:
    """Appends lines to ``sweep.jsonl`` (and case rows to ``sweep.csv``) in ``folder``;
    every call opens, writes and closes, so a killed process loses nothing it reported."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict) -> None:
        if self.folder is None:
            return
        clean = {
            k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()
        }
        with open(self.folder / "sweep.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean, default=str) + "\n")

    def meta(self, record: dict) -> None:
        self._append({"type": "meta", **record})

    def skip(self, record: dict) -> None:
        self._append({"type": "skip", **record})

    def case(self, record: dict) -> None:
        row = {name: record.get(name, "") for name in FIELDS}
        self._append({"type": "case", **row})
        if self.folder is None:
            return
        path = self.folder / "sweep.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: _plain(v) for k, v in row.items()})


def _plain(value: object) -> object:
    """A CSV cell: NaN empty, floats to 6 significant digits."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, list):
        return "; ".join(map(str, value))
    return value


def read(folder: str | Path) -> dict[str, list[dict]]:
    """``{"meta": [...], "case": [...], "skip": [...]}`` from ``sweep.jsonl``; a torn last
    line (a kill mid-write) is ignored."""
    out: dict[str, list[dict]] = {"meta": [], "case": [], "skip": []}
    path = Path(folder) / "sweep.jsonl"
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.setdefault(record.get("type", "case"), []).append(record)
    return out


def _num(value: object) -> float:
    return math.nan if value in (None, "") else float(value)  # type: ignore[arg-type]


def _group(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["kind"], row["m"], row["k"], row["n"], row["r"], row["mode"])
        groups.setdefault(key, {})[row["provider"]] = row
    return groups


def _ratio(by: dict[str, dict], peer: str) -> float:
    fused = _num(by.get("fused", {}).get("ms"))
    return _num(by.get(peer, {}).get("ms")) / fused


def summary_table(rows: list[dict]) -> str:
    """One line per case and mode: fused median ms (p10–p90), % of the roofline floor, each
    peer's time over the fused time (> 1: fused is faster), first-call error, ``auto``."""
    header = (
        "| case | mode | fused ms (p10–p90) | %roof | ×eager | ×compile | ×dense | "
        "rel err | auto |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [header]
    for (kind, m, k, n, r, mode), by in _group(rows).items():
        fused = by.get("fused")
        if fused is None:
            continue
        spread = (
            f"{_num(fused['ms']):.4f} ({_num(fused['ms_p10']):.4f}–{_num(fused['ms_p90']):.4f})"
        )
        err = _num(fused["rel_err"])
        flag = "" if err < MAX_REL_ERR else " !"
        cells = [f"{_ratio(by, p):.2f}" for p in ("torch", "compile", "dense")]
        cells = ["-" if c == "nan" else c for c in cells]
        lines.append(
            f"| {kind} M{m} K{k} N{n} R{r} | {mode} | {spread} | {_num(fused['pct_roofline']):.0f}"
            f" | {' | '.join(cells)} | {err:.1e}{flag} | {fused['auto']} |"
        )
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    """The kernel goals per measured case: target forward ≥ 1.15× eager and ≥ 1.0× the
    compiled chain; decode never slower than the eager chain."""
    lines = []
    for (kind, m, k, n, r, mode), by in _group(rows).items():
        label = f"{kind} M{m} K{k} N{n} R{r} {mode}"
        eager, compiled = _ratio(by, "torch"), _ratio(by, "compile")
        if kind == "target" and mode == "fwd":
            lines.append(
                f"{label}: ×eager {eager:.2f} ({_verdict(eager, GOAL_FWD_OVER_EAGER)}), "
                f"×compile {compiled:.2f} ({_verdict(compiled, GOAL_FWD_OVER_COMPILE)})"
            )
        elif kind == "decode":
            lines.append(f"{label}: ×eager {eager:.2f} ({_verdict(eager, GOAL_DECODE_OVER_EAGER)})")
    return lines


def _verdict(ratio: float, goal: float) -> str:
    if math.isnan(ratio):
        return "not measured"
    return f"{'met' if ratio >= goal else 'MISSED'}: goal ≥ {goal}"


def summarize(folder: str | Path, note: str = "") -> str:
    """The markdown summary of ``folder``'s ``sweep.jsonl``; also written to summary.md."""
    data = read(folder)
    metas = data["meta"]
    head = metas[0] if metas else {}
    lines = [
        f"# Kernel sweep: {head.get('device', '?')}, {head.get('date', '?')}",
        "",
        f"torch {head.get('torch', '?')} · triton {head.get('triton', '?')} · "
        f"python {head.get('python', '?')} · dtype {head.get('dtype', '?')} · "
        f"dry run: {head.get('dry_run', '?')}",
    ]
    for meta in metas:
        if meta.get("measured"):
            lines.append(f"measured peaks ({meta.get('stage')}): {meta['measured']}")
    if note:
        lines += ["", note]
    lines += ["", summary_table(data["case"]), "", "Goals:"]
    lines += [f"- {line}" for line in goal_lines(data["case"])] or ["- nothing measured"]
    errors = [r for r in data["case"] if r.get("error")]
    lines += [f"- error: {r['kind']} M{r['m']} R{r['r']} {r['mode']} {r['provider']}: "
              f"{r['error']}" for r in errors]  # fmt: skip
    if data["skip"]:
        lines += ["", f"Left out by the time limits: {len(data['skip'])} measurements: "
                  + ", ".join(s.get("what", "?") for s in data["skip"])]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (Path(folder) / "summary.md").write_text(text, encoding="utf-8")
    return text
