"""The levers of a cut, each measured on outside text: how much of the parent's general quality
one member keeps, by allocation and calibration text (zero-shot) and by training objective.

    python benchmarks/outside_text.py OUTSIDE            # fortunes.txt and manpages.txt
    python benchmarks/levers.py OUTSIDE --size 0.8 --work WORK
    python benchmarks/levers.py OUTSIDE --size 0.8 --work WORK --trained

Zero-shot (default): for each lever (``--levers``, default: every allocation calibrated on
Python's help pages, ``--data pydoc``, and the fisher allocation calibrated on parent-written
text) it runs ``plrd decompose --size SIZE`` on the default parent. ``--trained``: for each
recipe (allocation × objective × text) a one-member ``plrd family --sizes SIZE`` (the default
training budget, straight from the parent). Either is skipped when WORK already holds it. Then
``plrd eval DIR --eval-data SET`` for each outside set; the general perplexity, its ratio to the
parent's and the KL to the parent are read from what ``plrd eval`` prints. The table goes to
``benchmarks/results/levers-[trained-]SIZE-DATE.{json,md}``: the numbers are exactly those
commands'.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = ["--data", "pydoc"]  # the help pages: every lever below but the parent-written ones
UNCUT = ["--calibration", "uncut", *CORPUS]
LEVERS = {
    "uniform, corpus calibration": ["--allocation", "uniform", *UNCUT],
    "global, corpus calibration": ["--allocation", "global", *UNCUT],
    "fisher, corpus calibration (default)": ["--allocation", "fisher", *UNCUT],
    "fisher, parent-written calibration": ["--allocation", "fisher", "--data", "self"],
    "fisher, sequential calibration": [
        *("--allocation", "fisher", "--calibration", "sequential", *CORPUS)
    ],
    "fisher, sequential refit": ["--allocation", "fisher", "--calibration", "refit", *CORPUS],
}
TRAINED = {
    "uniform, lm (the first version's recipe)": [
        *("--allocation", "uniform", *UNCUT, "--objective", "lm")
    ],
    "uniform, kd": ["--allocation", "uniform", *UNCUT, "--objective", "kd"],
    "fisher, lm": ["--allocation", "fisher", *UNCUT, "--objective", "lm"],
    "fisher, kd (default)": ["--allocation", "fisher", *UNCUT, "--objective", "kd"],
    "fisher, kd, lr 3e-4": ["--allocation", "fisher", *UNCUT, "--objective", "kd", "--lr", "3e-4"],
    "fisher, kd, lr 3e-5": ["--allocation", "fisher", *UNCUT, "--objective", "kd", "--lr", "3e-5"],
    "fisher, refit, kd": [
        *("--allocation", "fisher", "--calibration", "refit", "--objective", "kd", *CORPUS)
    ],
    "fisher, kd, parent's own text": [
        *("--allocation", "fisher", "--objective", "kd", "--data", "self")
    ],
}
ROW = re.compile(
    r"^(?P<name>\S+): .*held-out ppl (?P<held>[\d.]+).*general ppl (?P<general>[\d.]+)"
    r"(?: \((?P<ratio>[\d.]+)x parent\))?, KL to parent (?P<kl>[\d.]+)"
)


def plrd(*args: str) -> str:
    """Run ``python -m plrd ARGS`` and return what it printed (the command echoed first)."""
    cmd = [sys.executable, "-m", "plrd", *args, "--no-progress"]
    print("$ plrd " + " ".join(args), flush=True)
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(done.stdout, flush=True)
    return done.stdout


def build(kind: str, lever: str, size: float, out: Path) -> None:
    """The member (zero-shot) or one-member family (trained) of ``lever`` in ``out``."""
    if kind == "trained":
        record = out / "family.json"
        if not (record.is_file() and json.loads(record.read_text())["members"]):
            plrd("family", "--sizes", str(size), "--out", str(out), *TRAINED[lever])
    elif not (out / "plrd.json").is_file():
        plrd("decompose", "--size", str(size), "--out", str(out), "--no-eval", *LEVERS[lever])


def rows(printed: str) -> dict:
    """{"parent": row, "member": row} from what one ``plrd eval`` printed."""
    found = [m.groupdict() for line in printed.splitlines() if (m := ROW.match(line))]
    return {"parent": found[0], "member": found[-1]}


def measure(member: Path, outside: dict[str, Path]) -> dict:
    """{set: {"parent": row, "member": row}} from ``plrd eval`` on each outside set, kept in
    ``member/outside.json`` so that a rerun measures only what is missing."""
    done = member / "outside.json"
    out = json.loads(done.read_text()) if done.is_file() else {}
    for name, path in outside.items():
        if name not in out:
            out[name] = rows(plrd("eval", str(member), "--eval-data", str(path)))
            done.write_text(json.dumps(out, indent=2) + "\n")
    return out


def table(results: dict, sets: list[str]) -> str:
    head = "| lever | held-out ppl | " + " | ".join(f"{s} ppl (× parent) | KL" for s in sets)
    lines = [head + " |", "|---" * (2 + 2 * len(sets)) + "|"]
    first = next(iter(results.values()))
    parent = [first[s]["parent"] for s in sets]
    lines.append(
        f"| parent | {parent[0]['held']} | "
        + " | ".join(f"{p['general']} (1.00) | 0" for p in parent)
        + " |"
    )
    for lever, by_set in results.items():
        cells = [
            f"{by_set[s]['member']['general']} ({by_set[s]['member']['ratio']}) | "
            f"{by_set[s]['member']['kl']}"
            for s in sets
        ]
        lines.append(
            f"| {lever} | {by_set[sets[0]]['member']['held']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outside", type=Path, help="folder with fortunes.txt and manpages.txt")
    parser.add_argument("--size", type=float, default=0.8)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/plrd/levers")
    parser.add_argument("--trained", action="store_true", help="train each recipe one stage")
    parser.add_argument("--levers", nargs="+", default=None, choices=[*LEVERS, *TRAINED])
    args = parser.parse_args(argv)
    kind = "trained" if args.trained else "zero-shot"
    levers = args.levers or list(TRAINED if args.trained else LEVERS)
    outside = {p.stem: p for p in sorted(args.outside.glob("*.txt"))}
    results = {}
    for lever in levers:
        slug = re.sub(r"[^a-z0-9]+", "-", lever.lower()).strip("-")
        out = args.work / kind / f"{slug}-{args.size:.2f}"
        build(kind, lever, args.size, out)
        results[lever] = measure(out, outside)
    date = datetime.date.today().isoformat()
    stem = RESULTS / f"levers-{'trained-' if args.trained else ''}{args.size:.2f}-{date}"
    earlier = Path(f"{stem}.json")
    if earlier.is_file():  # a run of some levers adds to the day's table, never drops rows
        results = {**json.loads(earlier.read_text()), **results}
    Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = (
        f"# {kind.capitalize()} levers at size {args.size} ({date})\n\n"
        f"`python benchmarks/levers.py OUTSIDE --size {args.size}"
        f"{' --trained' if args.trained else ''}`: one "
        f"{'one-stage `plrd family`' if args.trained else '`plrd decompose`'} per lever, then "
        "`plrd eval DIR --eval-data SET` per outside set (held-out ppl: 4,096 held-out tokens of "
        "the default corpus; the outside sets from `benchmarks/outside_text.py`).\n\n"
        + table(results, list(outside))
    )
    Path(f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
