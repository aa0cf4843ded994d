"""Triton-side settings shared by the kernels: interpreter mode, autotune configs, launching.

Import this (and the kernel modules) only after ``TRITON_INTERPRET`` has its final value:
``triton.jit`` reads it when it decorates a kernel. ``plrd_kernels.op`` imports the kernel
modules lazily, on the first call that needs them.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Kernels in this process were decorated for the CPU interpreter."""

AUTOTUNE = os.environ.get("PLRD_AUTOTUNE", "1") != "0"
"""``PLRD_AUTOTUNE=0``: every kernel uses its one fixed config, no tuning (quick GPU test
runs that compile many shapes once each)."""

INTERPRETER_SMS = 4
"""Pretend SM count under the interpreter: small, so tests exercise split-N and split-M."""


def autotune(
    configs: Sequence[triton.Config], interpreter_config: triton.Config, key: list[str]
) -> Callable[[Any], Any]:
    """``triton.autotune`` over ``configs`` on a GPU. A single config, never benchmarked,
    under the interpreter (``interpreter_config``: autotuning there would run every config
    many times, on the CPU) or with ``PLRD_AUTOTUNE=0`` (``configs[-1]``: each list ends
    with its smallest config, the one sure to fit in shared memory)."""
    if INTERPRET:
        chosen = [interpreter_config]
    elif not AUTOTUNE:
        chosen = [configs[-1]]
    else:
        chosen = list(configs)
    extra = {}
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        extra["do_bench"] = _quick_bench
    return triton.autotune(configs=chosen, key=key, **extra)


def _quick_bench(kernel_call: Callable[[], None], quantiles: Any) -> Any:
    """Autotuning timer: 5 ms warm-up and 20 ms of runs per config, not Triton's 25 + 100 ms
    (a new shape bucket costs about 0.1 s of tuning per kernel instead of 0.5 s)."""
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    """Shorthand for ``triton.Config(blocks, num_warps=..., num_stages=...)``."""
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def launch(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    """Run ``kernel[grid](*args, **kwargs)``; on a GPU through ``torch.library.wrap_triton``
    so ``torch.compile`` and ``torch.export`` can trace the launch.

    Under the interpreter ``wrap_triton`` needs a GPU driver, so the kernel is called
    directly, and a launch on fake tensors (shape propagation) does nothing, as
    ``wrap_triton`` does there."""
    if not INTERPRET:
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    elif not any(isinstance(arg, FakeTensor) for arg in args):
        kernel[grid](*args, **kwargs)


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``INTERPRETER_SMS`` for CPU tensors)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_sms(index)


def tf32_allowed(dtype: torch.dtype) -> bool:
    """The kernels' ``ALLOW_TF32``: fp32 follows ``torch.backends.cuda.matmul.allow_tf32``
    (TF32 tensor cores when allowed, exact IEEE fp32 otherwise); fp16/bf16 products are
    exact in the fp32 accumulator either way (True keeps Triton's default)."""
    return dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32)
