"""Whitened vs plain SVD: relative output error of every decoder linear of a real model.

For a layer W and its rank-r replacement W', the relative output error on inputs X is
‖(W − W')X‖² / ‖WX‖² = tr(D G Dᵀ) / tr(W G Wᵀ) with D = W − W' and G = Σ xᵀx. The factors are
fitted on calibration blocks (training split) and the error is measured both there and on
held-out blocks, so the table shows how much of the whitening gain generalises.

    python benchmarks/whitening_error.py [--model smollm2-135m] [--tokens 4096]
        [--fractions 0.25,0.5,0.75] [--out benchmarks/results/whitening-smollm2-135m.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import plrd
from plrd.core.factorize import svd_factors, whitened_svd_factors
from plrd.core.targets import find_targets
from plrd.family.data import build_corpus, load_documents
from plrd.io.models import load_model


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(D G Dᵀ) / tr(W G Wᵀ) with D = weight − approx, all float64."""
    diff = weight - approx
    return float(((diff @ gram) * diff).sum() / ((weight @ gram) * weight).sum())


def layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration and held-out tokens")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fractions", default="0.25,0.5,0.75", help="kept rank / min(out, in)")
    parser.add_argument("--out", default="benchmarks/results/whitening-smollm2-135m.json")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]

    model, tokenizer, resolved = load_model(args.model)
    corpus = build_corpus(load_documents(None), tokenizer, args.seq_len)
    calib = corpus.calibration_blocks(args.tokens)
    held = corpus.eval_blocks(args.tokens)
    grams_calib = plrd.collect_grams(model, [b[None] for b in calib])
    grams_held = plrd.collect_grams(model, [b[None] for b in held])

    rows = []
    start = time.perf_counter()
    for name, module in find_targets(model).items():
        weight = module.weight.detach().double()
        g_cal, g_held = grams_calib[name], grams_held[name]
        for fraction in fractions:
            rank = max(1, round(fraction * min(weight.shape)))
            up, down = svd_factors(weight, rank)
            plain = up @ down
            (up, down), ridge = whitened_svd_factors(weight, rank, g_cal)
            white = up @ down
            rows.append(
                {
                    "layer": name,
                    "kind": layer_kind(name),
                    "shape": list(weight.shape),
                    "fraction": fraction,
                    "rank": rank,
                    "ridge": ridge,
                    "plain_calib": relative_output_error(weight, plain, g_cal),
                    "white_calib": relative_output_error(weight, white, g_cal),
                    "plain_held": relative_output_error(weight, plain, g_held),
                    "white_held": relative_output_error(weight, white, g_held),
                }
            )
    seconds = time.perf_counter() - start

    summary = []
    for fraction in fractions:
        subset = [r for r in rows if r["fraction"] == fraction]
        entry = {"fraction": fraction}
        for key in ("plain_calib", "white_calib", "plain_held", "white_held"):
            entry[key] = statistics.median(r[key] for r in subset)
        entry["white_better_held"] = sum(r["white_held"] < r["plain_held"] for r in subset)
        entry["layers"] = len(subset)
        summary.append(entry)

    print(f"\n{resolved}: median relative output error over {len(rows) // len(fractions)} layers")
    print(
        "| kept rank / full | plain SVD (calib) | whitened (calib) | plain SVD (held-out) "
        "| whitened (held-out) | layers where whitened wins (held-out) |"
    )
    print("|---|---|---|---|---|---|")
    for e in summary:
        print(
            f"| {e['fraction']:.2f} | {e['plain_calib']:.4f} | {e['white_calib']:.4f} | "
            f"{e['plain_held']:.4f} | {e['white_held']:.4f} | "
            f"{e['white_better_held']}/{e['layers']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "calibration_tokens": int(calib.numel()),
                "held_out_tokens": int(held.numel()),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "seconds": round(seconds, 1),
                "summary": summary,
                "layers": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
