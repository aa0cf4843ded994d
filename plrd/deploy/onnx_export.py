"""Export a causal-LM member (or its dense parent) to ONNX with KV cache, and validate it.

:func:`export_onnx` traces the model with ``torch.onnx.export(dynamo=True)`` (torch.export +
onnxscript) through a thin wrapper whose inputs and outputs are flat tensors (interface in
:mod:`plrd.deploy.onnx_runtime`; batch, sequence and past axes are dynamic). ``LowRankLinear``
layers export as what their forward computes, two MatMuls (x·downᵀ, then ·upᵀ); nothing is
multiplied back to dense. The output directory holds::

    model.onnx            the graph (+ model.onnx.data when the weights exceed 2 GB)
    config.json           the Hugging Face config (+ generation_config.json if present)
    tokenizer files       as in the source directory (or ``tokenizer.save_pretrained``)
    plrd-export.json      inputs/outputs, opset, versions, layers kept factored, validation

Validation runs the graph in ONNX Runtime against the PyTorch model on a few prompts: max
|Δlogit| at every position (one pass, and prefix + rest through the KV cache), and greedy
tokens with and without cache reuse against ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plrd.core.counting import count_parameters
from plrd.core.layer import LowRankLinear
from plrd.deploy.errors import ExportError, ValidationError, require_onnx_extra
from plrd.deploy.onnx_graph import expected_weight_products, graph_weight_products
from plrd.deploy.onnx_runtime import MODEL_FILE, OnnxCausalLM
from plrd.deploy.onnx_trace import trace_onnx
from plrd.deploy.onnx_validate import PromptCheck, check_prompt, make_prompts
from plrd.io.members import is_member_dir, load_pretrained

__all__ = ["ExportReport", "export_onnx", "ExportError", "ValidationError", "OnnxCausalLM"]

METADATA_FILE = "plrd-export.json"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class ExportReport:
    """What :func:`export_onnx` wrote and how the graph compared with PyTorch.

    ``files`` maps file name → bytes; ``checks`` holds one :class:`PromptCheck` per prompt;
    ``passed`` is True when the factored layers stayed two MatMuls, every logit difference is
    ≤ ``tolerance + rtol · max |logit|`` and every greedy sequence matched.
    """

    def __init__(
        self, out_dir: Path, source: str, opset: int, tolerance: float, rtol: float
    ) -> None:
        self.out_dir, self.source, self.opset = out_dir, source, opset
        self.tolerance, self.rtol = tolerance, rtol
        self.files: dict[str, int] = {}
        self.checks: list[PromptCheck] = []
        self.export_seconds = self.validate_seconds = 0.0
        self.parameters = 0
        self.factored_layers: dict[str, int] = {}
        self.factored_kept = True

    @property
    def max_abs_logit_diff(self) -> float | None:
        """Largest |Δlogit| over all prompts, positions and both cache modes (None: none run)."""
        diffs = [d for c in self.checks for d in (c.logits_diff, c.logits_diff_cached)]
        return max(diffs) if diffs else None

    @property
    def passed(self) -> bool:
        """Factored layers kept as two products, every prompt within tolerance and equal."""
        return self.factored_kept and all(c.passed(self.tolerance, self.rtol) for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "opset": self.opset,
            "files": self.files,
            "parameters": self.parameters,
            "factored_layers": self.factored_layers,
            "factored_kept_as_two_matmuls": self.factored_kept,
            "export_seconds": round(self.export_seconds, 2),
            "validation": {
                "tolerance": self.tolerance,
                "rtol": self.rtol,
                "passed": self.passed,
                "max_abs_logit_diff": self.max_abs_logit_diff,
                "seconds": round(self.validate_seconds, 2),
                "prompts": [c.to_dict() for c in self.checks],
            },
        }

    def __str__(self) -> str:
        head = (
            f"exported {self.source} → {self.out_dir} (opset {self.opset}, "
            f"{len(self.factored_layers)} factored layers, {self.export_seconds:.1f} s)"
        )
        rows = [c.row() for c in self.checks]
        tol = f"|Δ| ≤ {self.tolerance:g} + {self.rtol:g}·max|logit|"
        verdict = f"validation {'passed' if self.passed else 'FAILED'} ({tol})"
        return "\n".join([head, *(["  " + PromptCheck.header(), *rows] if rows else []), verdict])


# --------------------------------------------------------------------------- loading


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_causal_config(config: Any, where: str) -> None:
    """Raise unless the config's architectures (else its model type) name a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if architectures:  # saved by save_pretrained: the class it was saved from
        ok = any(a in _causal_lm_names() for a in architectures)
    else:  # config.save_pretrained alone records no class; the model type must have one
        ok = getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not ok or getattr(config, "is_encoder_decoder", False):
        kind = ", ".join(architectures) or getattr(config, "model_type", "unknown")
        raise ExportError(
            f"{where} is not a causal language model ({kind}); the ONNX export handles "
            "decoder-only *ForCausalLM models with a KV cache"
        )


def _load_dir(directory: Path) -> nn.Module:
    """The model saved in ``directory``: a plrd member, else a dense Hugging Face model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not directory.exists():
        raise ExportError(f"{directory} does not exist; pass a member or model directory")
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory; pass a member or model directory")
    if not (directory / "config.json").is_file():
        raise ExportError(
            f"{directory} is not a plrd member or Hugging Face model directory (no config.json); "
            "pass a directory written by `plrd decompose`/`plrd family` or save_pretrained"
        )
    try:
        _check_causal_config(AutoConfig.from_pretrained(directory), str(directory))
        if is_member_dir(directory):
            return load_pretrained(directory)
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    except ExportError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"{directory} could not be loaded: {error}") from error


def _as_model(model_or_dir: Any) -> tuple[nn.Module, Path | None, str]:
    """``(model in fp32, eval mode; source directory or None; label)``; the input is not changed."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir).expanduser()
        return _load_dir(directory), directory, str(directory)
    if not isinstance(model_or_dir, nn.Module) or not hasattr(model_or_dir, "config"):
        raise ExportError(
            f"export_onnx needs a member directory or a transformers causal LM, got "
            f"{type(model_or_dir).__name__}"
        )
    label = type(model_or_dir).__name__
    if label not in _causal_lm_names():
        raise ExportError(f"{label} is not a causal language model; pass a *ForCausalLM model")
    model = model_or_dir
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    return model.eval(), None, label


# --------------------------------------------------------------------------- writing


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of ``out_dir``, renamed into place when the export is done."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not empty; pass overwrite=True or another out")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    elif out_dir.exists():
        out_dir.unlink()
    os.replace(tmp, out_dir)


def _load_tokenizer(directory: Path | None) -> Any:
    """The directory's tokenizer, or None when it has none (validation then uses token ids)."""
    if directory is None or not any((directory / n).is_file() for n in COPIED_FILES[2:]):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return None


def _write_side_files(model: nn.Module, source: Path | None, tokenizer: Any, out: Path) -> None:
    """config, generation config and tokenizer files: copied from ``source`` or saved anew.

    An explicit ``tokenizer`` is saved when ``source`` had no tokenizer files to copy.
    """
    copied = [n for n in COPIED_FILES if source is not None and (source / n).is_file()]
    for name in copied:
        shutil.copy2(source / name, out / name)
    if source is None:
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    if tokenizer is not None and not set(copied) - {"config.json", "generation_config.json"}:
        tokenizer.save_pretrained(out)


def _metadata(report: ExportReport, runner: OnnxCausalLM, out: Path) -> dict[str, Any]:
    from importlib.metadata import version

    def io(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "type": v.type, "shape": list(v.shape)} for v in values]

    packages = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "plrd")
    report.files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return {
        "format": "onnx",
        "model_file": MODEL_FILE,
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": {name: version(name) for name in packages},
        "dtype": "float32",
        "num_layers": runner.num_layers,
        "num_key_value_heads": runner.kv_heads,
        "head_dim": runner.head_dim,
        "inputs": io(runner.session.get_inputs()),
        "outputs": io(runner.session.get_outputs()),
        **report.to_dict(),
    }


def _describe_model(report: ExportReport, model: nn.Module, onnx_path: Path) -> None:

    report.parameters = count_parameters(model)
    report.factored_layers = {
        name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)
    }
    report.factored_kept = graph_weight_products(onnx_path) == expected_weight_products(model)


# --------------------------------------------------------------------------- export


def export_onnx(
    model_or_dir: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    opset: int | None = None,
    validate_prompts: Sequence[str | Sequence[int]] | None = None,
    validate: bool = True,
    max_new_tokens: int = 20,
    tolerance: float = 1e-4,
    rtol: float = 1e-5,
    threads: int | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a member or dense causal LM to ``out_dir`` as ONNX with KV cache; validate it.

    Args:
        model_or_dir: a member directory (``plrd.json``), a Hugging Face model directory (a
            dense parent), or a loaded transformers ``*ForCausalLM`` (set to eval mode; cast to
            fp32 on a copy if it is not fp32).
        out_dir: directory to write (see the module docs); must be empty unless ``overwrite``.
        tokenizer: saved beside the graph and used for text prompts; default: the directory's.
        opset: ONNX opset (None: the exporter's default).
        validate_prompts: texts or token-id lists (None: three defaults, or random ids when
            there is no tokenizer); ``validate=False`` skips validation.
        max_new_tokens: greedy tokens compared per prompt.
        tolerance, rtol: max |Δlogit| allowed is ``tolerance + rtol · max |logit|`` per prompt
            (fp32 sums in another order differ by ~1e-6 relative: 1e-4 absolute holds for a
            tiny model, SmolLM2-135M's logits of ~±30 need the relative part).
        threads: ONNX Runtime intra-op threads for the validation session.

    Returns an :class:`ExportReport`. Raises ExportError (bad input, exporter failure, out_dir
    not empty), MissingExtraError (no onnx/onnxscript/onnxruntime), ValidationError (beyond
    tolerance, a greedy mismatch, or a factored layer not kept as two MatMuls; the files stay
    written with the figures in ``plrd-export.json``).
    """
    require_onnx_extra()
    model, source_dir, label = _as_model(model_or_dir)
    out_dir = Path(out_dir).expanduser()
    tmp = _prepare_out(out_dir, overwrite)
    try:
        report = _export_into(model, tmp, out_dir, label, opset, (tolerance, rtol))
        tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(source_dir)
        _write_side_files(model, source_dir, tokenizer, tmp)
        runner = OnnxCausalLM(tmp, threads=threads)
        if validate:
            start = time.perf_counter()
            prompts = make_prompts(validate_prompts, tokenizer, model.config.vocab_size)
            report.checks = [check_prompt(model, runner, p, max_new_tokens) for p in prompts]
            report.validate_seconds = time.perf_counter() - start
        metadata = _metadata(report, runner, tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        del runner
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    if not report.passed:
        raise ValidationError(_failure(report), report)
    return report


def _export_into(
    model: nn.Module,
    tmp: Path,
    out_dir: Path,
    label: str,
    opset: int | None,
    tolerances: tuple[float, float],
) -> ExportReport:
    """Trace and save ``tmp/model.onnx``; a report with the opset, timing and layer facts."""
    start = time.perf_counter()
    program, _ = trace_onnx(model, opset)
    program.save(str(tmp / MODEL_FILE))  # weights go to model.onnx.data above 2 GB
    report = ExportReport(out_dir, label, program.model.opset_imports[""], *tolerances)
    report.export_seconds = time.perf_counter() - start
    _describe_model(report, model, tmp / MODEL_FILE)
    return report


def _failure(report: ExportReport) -> str:
    if not report.factored_kept:
        return (
            f"{report.out_dir}: a factored layer did not export as two MatMuls (see "
            f"{METADATA_FILE}); report this with the model's architecture"
        )
    diff = report.max_abs_logit_diff
    return (
        f"{report.out_dir}: ONNX Runtime disagrees with PyTorch (max |Δlogit| {diff:.2e}, "
        f"allowed {report.tolerance:g} + {report.rtol:g}·max|logit|, or greedy tokens differ); "
        f"figures in {METADATA_FILE}"
    )
