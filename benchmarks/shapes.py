"""Kernel benchmark shapes and their roofline floors (shared by the sweep and benchmark suites).

A case is ``x [M, K] · downᵀ [K, R] · upᵀ [R, N] + bias [N]`` in bf16. Cost model, with
e bytes per element (docs/kernels.md §1):

- forward FLOPs ``2·M·R·(K + N)``; bytes ``e·(M·K + M·N + R·K + N·R + N)`` (read x, the
  factors and bias; write y).
- forward + backward FLOPs ``6·M·R·(K + N)`` (dT = dY·up, dX = dT·down, d up = dYᵀ·T,
  d down = dTᵀ·x); bytes: the forward's plus ``e·(M·N + 2·M·K + 2·(R·K + N·R) + N)``
  (read dY, x and the factors; write dX and the factor and bias gradients). T [M, R] is
  not counted: the floor is what any implementation must move.
- floor time ``max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES_PER_S)``.

Peaks are the H200 figures measured on the project's GPU machine (docs/kernels.md §7).
"""

from __future__ import annotations

from typing import NamedTuple

PEAK_FLOPS = 790e12
"""bf16 dense matmul FLOP/s measured on the H200 (docs/kernels.md §7)."""

PEAK_BYTES_PER_S = 4.3e12
"""Device copy bandwidth measured on the H200 (docs/kernels.md §7)."""

ELEMENT_BYTES = 2  # bf16

TRAINING_M = (4096, 16384)
TRAINING_KN = ((4096, 4096), (11008, 4096), (4096, 11008))
RANKS = (64, 128, 256, 1024)
TARGET_MKN = (8192, 4096, 4096)
"""The headline shape: M = 8192 tokens, a 4096 → 4096 layer."""
TARGET_RANKS = (64, 128, 256)
"""The ranks of the GPU check's target sweep (memory-bound 64, 128; compute-bound 256)."""
DECODE_M = (1, 16)
DECODE_RANKS = (64, 128, 256)


class Case(NamedTuple):
    """One benchmark point. ``kind``: "target", "training" or "decode"."""

    kind: str
    m: int
    k: int
    n: int
    r: int

    @property
    def label(self) -> str:
        return f"M{self.m} K{self.k} N{self.n} R{self.r}"


def target_cases() -> list[Case]:
    m, k, n = TARGET_MKN
    return [Case("target", m, k, n, r) for r in TARGET_RANKS]


def training_cases() -> list[Case]:
    return [Case("training", m, k, n, r) for m in TRAINING_M for k, n in TRAINING_KN for r in RANKS]


def decode_cases() -> list[Case]:
    """Decode shapes, K = N = 4096 first (the GPU check's time limit may cut the tail)."""
    return [
        Case("decode", m, k, n, r) for k, n in TRAINING_KN for m in DECODE_M for r in DECODE_RANKS
    ]


def cases(kind: str) -> list[Case]:
    """The cases of one kind ("target", "decode" or "training"), in the order they run."""
    return {"target": target_cases, "decode": decode_cases, "training": training_cases}[kind]()


def all_cases() -> list[Case]:
    """The target shape, then decode (forward only, quick), then training."""
    return target_cases() + decode_cases() + training_cases()


def flops(case: Case, backward: bool) -> float:
    """FLOPs of the low-rank op (forward, or forward + backward)."""
    forward = 2.0 * case.m * case.r * (case.k + case.n)
    return 3.0 * forward if backward else forward


def _bytes(m: int, k: int, n: int, weights: int, backward: bool, element_bytes: int) -> float:
    forward = m * k + m * n + weights + n
    if not backward:
        return float(element_bytes * forward)
    return float(element_bytes * (forward + m * n + 2 * m * k + 2 * weights + n))


def bytes_moved(case: Case, backward: bool, element_bytes: int = ELEMENT_BYTES) -> float:
    """Compulsory bytes of the low-rank op (see the module docstring)."""
    weights = case.r * case.k + case.n * case.r
    return _bytes(case.m, case.k, case.n, weights, backward, element_bytes)


def dense_bytes(case: Case, backward: bool, element_bytes: int = ELEMENT_BYTES) -> float:
    """Compulsory bytes of the dense ``nn.Linear`` (weight N×K)."""
    return _bytes(case.m, case.k, case.n, case.n * case.k, backward, element_bytes)


def floor_seconds(case: Case, backward: bool) -> float:
    """Roofline floor: ``max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES_PER_S)``."""
    return max(flops(case, backward) / PEAK_FLOPS, bytes_moved(case, backward) / PEAK_BYTES_PER_S)


def dense_flops(case: Case, backward: bool) -> float:
    """FLOPs of the dense ``nn.Linear`` (K → N) the factors replace."""
    forward = 2.0 * case.m * case.k * case.n
    return 3.0 * forward if backward else forward


def roofline_table(cases: list[Case] | None = None) -> str:
    """Markdown table: FLOPs, bytes, arithmetic intensity and floor per case and mode."""
    cases = all_cases() if cases is None else cases
    lines = [
        "| case | mode | GFLOP | MB | FLOP/B | floor µs | bound |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        for backward in (False, True) if case.kind != "decode" else (False,):
            f, b = flops(case, backward), bytes_moved(case, backward)
            bound = "compute" if f / PEAK_FLOPS >= b / PEAK_BYTES_PER_S else "memory"
            lines.append(
                f"| {case.kind} {case.label} | {'fwd+bwd' if backward else 'fwd'} | "
                f"{f / 1e9:.3g} | {b / 1e6:.3g} | {f / b:.0f} | "
                f"{floor_seconds(case, backward) * 1e6:.1f} | {bound} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# pytest-benchmark suite (test_bench_*.py): layer shapes, kept fractions and model sizes. The
# CPU cases run fp32 through the torch path; the CUDA cases reuse the shapes with more tokens.
# A layer shape's tokens M are the rows of ``x [M, in]`` fed to the layer.


class LayerShape(NamedTuple):
    """A dense layer ``in_features → out_features`` and the tokens M fed to it per device."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    cpu_tokens: int
    cuda_tokens: int


#: Fractions of the parameters kept by the factored layers and models.
KEEPS = (0.75, 0.5, 0.25)

#: nn.Linear-shaped layers: a generic square layer (the 2.5× target: keep 0.25, batch 512),
#: the SmolLM2-135M MLP up-projection and the Llama-7B MLP up-projection.
LAYER_SHAPES = (
    LayerShape("square-2048to2048", 2048, 2048, True, 512, 8192),
    LayerShape("smollm2-576to1536", 576, 1536, False, 512, 8192),
    LayerShape("llama7b-4096to11008", 4096, 11008, False, 128, 8192),
)

#: The SmolLM2-135M architecture (random weights are enough for speed).
SMOLLM2_CONFIG = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}

#: Model inference: (batch, sequence length) of one forward pass, and the decode run
#: (prompt length, new tokens) at batch 1.
MODEL_FORWARD_BATCH = (4, 128)
MODEL_DECODE = (16, 32)
#: One training step (forward, backward, AdamW step) on (batch, sequence length).
MODEL_TRAIN_BATCH = (2, 64)
#: Gram collection: number of batches of MODEL_FORWARD_BATCH.
GRAM_BATCHES = 2

#: Re-truncation of a factored layer: (name, in_features, out_features, rank, new rank).
RETRUNCATE_CASES = (
    ("smollm2-576to1536-r209to104", 576, 1536, 209, 104),
    ("square-4096to4096-r1024to768", 4096, 4096, 1024, 768),
)
