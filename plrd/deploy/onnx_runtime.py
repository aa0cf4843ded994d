"""``OnnxCausalLM``: run an exported causal LM in ONNX Runtime (forward with KV cache, greedy).

The graph's interface (written by :func:`plrd.deploy.onnx_export.export_onnx`; the names follow
the convention of Hugging Face optimum's decoder exports)::

    input_ids               int64   [batch, seq]
    attention_mask          int64   [batch, past + seq]      1 = attend, 0 = padding
    position_ids            int64   [batch, seq]
    past_key_values.{i}.key float32 [batch, kv_heads, past, head_dim]   (and .value), i < layers
    → logits                float32 [batch, seq, vocab]
    → present.{i}.key       float32 [batch, kv_heads, past + seq, head_dim]  (and .value)

``past`` may be 0: the first step feeds empty past tensors. The layout is read from the
session's inputs, so any graph with these names runs here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from plrd.deploy.errors import ExportError, require_onnx_extra
from plrd.errors import InputError

MODEL_FILE = "model.onnx"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def default_position_ids(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last ``seq`` tokens: running count of attended tokens − 1 ([B, seq]).

    Padding (mask 0) gets position 1, as transformers' ``generate`` does; left padding then
    leaves the real tokens at positions 0, 1, ...
    """
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 1
    return positions[:, -seq:].astype(np.int64)


def _past_names(names: list[str]) -> list[str]:
    """``past_key_values.{i}.{key,value}`` inputs ordered by layer, key before value."""
    found = [(int(m[1]), m[2] == "value", n) for n in names if (m := _PAST.match(n))]
    return [name for _, _, name in sorted(found)]


class OnnxCausalLM:
    """An exported causal LM in an ``onnxruntime.InferenceSession`` (numpy in, numpy out).

    Args:
        export_dir: a directory written by ``export_onnx`` (``model.onnx`` [+ ``.data``]).
        threads: ONNX Runtime ``intra_op_num_threads`` (None: its default, all cores);
            ``inter_op_num_threads`` is 1.
        providers: execution providers (default ``["CPUExecutionProvider"]``).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        model_file: str = MODEL_FILE,
    ) -> None:
        require_onnx_extra("onnxruntime")
        import onnxruntime as ort

        path = Path(export_dir) / model_file
        if not path.is_file():
            raise ExportError(
                f"{export_dir} has no {model_file}; pass a directory written by "
                "plrd.deploy.onnx_export.export_onnx (plrd export --format onnx)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        self._read_layout(path)

    def _read_layout(self, path: Path) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.past_names = _past_names(self.input_names)
        if "input_ids" not in inputs or not self.past_names:
            raise ExportError(
                f"{path} is not a causal LM with KV cache (inputs {self.input_names}); "
                "re-export it with plrd.deploy.onnx_export.export_onnx"
            )
        self.present_names = ["present." + n.split(".", 1)[1] for n in self.past_names]
        self.output_names = ["logits", *self.present_names]
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.num_layers = len(self.past_names) // 2
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors [batch, kv_heads, 0, head_dim] for the first step."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        past: list[np.ndarray] | None = None,
        position_ids: Any = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One pass: ``(logits [B, S, V], present)`` for ``input_ids`` [B, S] after ``past``.

        ``attention_mask`` [B, P + S] defaults to ones; ``past`` (2·layers arrays
        [B, kv_heads, P, head_dim], key then value per layer, e.g. a previous ``present``)
        defaults to empty; ``position_ids`` [B, S] default to :func:`default_position_ids`.
        ``present`` holds the 2·layers arrays [B, kv_heads, P + S, head_dim].
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        past = self.empty_past(batch) if past is None else past
        if len(past) != len(self.past_names):
            raise InputError(f"past has {len(past)} arrays, the graph takes {len(self.past_names)}")
        total = seq + past[0].shape[2]
        mask = (
            np.ones((batch, total), dtype=np.int64)
            if attention_mask is None
            else np.asarray(attention_mask, dtype=np.int64)
        )
        if mask.shape != (batch, total):
            raise InputError(f"attention_mask is {mask.shape}, expected {(batch, total)}")
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = (
                default_position_ids(mask, seq)
                if position_ids is None
                else np.asarray(position_ids, dtype=np.int64)
            )
        feeds.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        *,
        attention_mask: Any = None,
        use_cache: bool = True,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding: ``input_ids`` [B, S] (or [S]) → ids [B, S + n], n ≤ max_new_tokens.

        ``use_cache``: feed each new token with the previous step's ``present`` (False:
        recompute the whole sequence every step). With ``eos_token_id``, a row that produced it
        continues with ``pad_token_id`` (default: eos) and decoding stops when all rows have;
        without it exactly ``max_new_tokens`` tokens are produced.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = (
            np.ones(ids.shape, dtype=np.int64)
            if attention_mask is None
            else np.asarray(attention_mask, dtype=np.int64)
        )
        pad = eos_token_id if pad_token_id is None else pad_token_id
        finished = np.zeros(ids.shape[0], dtype=bool)
        past, step = None, ids
        for _ in range(int(max_new_tokens)):
            logits, present = self.forward(step, mask, past if use_cache else None)
            token = logits[:, -1].argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                token = np.where(finished, pad, token)
                finished |= token == eos_token_id
            ids = np.concatenate([ids, token[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
            past, step = (present, token[:, None]) if use_cache else (None, ids)
            if eos_token_id is not None and finished.all():
                break
        return ids
