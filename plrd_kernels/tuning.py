"""Triton-side settings shared by the kernels: interpreter mode, autotuning, launching.

Import this (and the kernel modules) only after ``TRITON_INTERPRET`` has its final value:
``triton.jit`` reads it when it decorates a kernel. ``plrd_kernels.op`` imports the kernel
modules lazily, on the first call that needs them.

Autotune keys are coarsened at lookup time, not on the host side of a launch: a kernel is
keyed on its raw arguments (``M``, strides) and ``BucketedCache`` maps them to buckets
(``M`` to a power of two, a stride to "is it 1"). The traced graph under ``torch.compile``
then holds only the symbolic ``M``, and the bucket is computed from the concrete value when
the autotuner runs (docs/kernels.md §4, §5).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


class BucketedCache(dict):
    """``Autotuner.cache`` whose keys are coarsened before every lookup and store.

    Triton builds the key as the values of the ``key`` arguments in order, then the dtypes of
    the tensor arguments. ``maps[i]`` (if not None) replaces the i-th value, so e.g. every M
    in one power-of-two bucket shares one tuned config.
    """

    def __init__(self, maps: Sequence[Callable[[Any], Any] | None]) -> None:
        super().__init__()
        self.maps = tuple(maps)

    def _coarse(self, key: tuple) -> tuple:
        head = tuple(v if f is None else f(v) for f, v in zip(self.maps, key, strict=False))
        return head + tuple(key[len(self.maps) :])

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._coarse(key))  # type: ignore[arg-type]

    def __getitem__(self, key: tuple) -> Any:
        return super().__getitem__(self._coarse(key))

    def __setitem__(self, key: tuple, value: Any) -> None:
        super().__setitem__(self._coarse(key), value)

    def get(self, key: tuple, default: Any = None) -> Any:
        return super().get(self._coarse(key), default)


def unit_stride(stride: int) -> bool:
    """Key map for a stride: only whether it is 1 (the operand's layout), not its value."""
    return stride == 1


_TUNERS: list[tuple[Any, list[triton.Config], list[triton.Config]]] = []
"""Every autotuner made by ``autotune``: (tuner, its GPU configs, its interpreter configs)."""


def autotune(
    configs: Sequence[triton.Config],
    interpreter_configs: Sequence[triton.Config],
    key: Sequence[str],
    buckets: Mapping[str, Callable[[Any], Any]] | None = None,
) -> Callable[[Any], ByPrecision]:
    """Decorate a kernel with two autotuners (``ByPrecision``), keyed on ``key`` with
    ``buckets`` applied (see ``BucketedCache``): fp16/bf16 inputs tune over ``configs``,
    fp32 inputs run ``configs[-1]`` alone. Each list ends with its smallest config, the one
    sure to fit; in IEEE fp32 the larger ones spill kilobytes of registers per thread and
    take minutes of ``ptxas`` between them on a first call (benchmarks/NOTES.md §9), for a
    precision ``auto`` never sends to Triton. Under the interpreter both tune over
    ``interpreter_configs`` (one config, never benchmarked, unless ``fresh_autotuning``);
    with ``PLRD_AUTOTUNE=0`` both run ``configs[-1]``."""
    if len(interpreter_configs) < 2:
        raise ValueError("give at least two interpreter configs (fresh_autotuning tunes them)")
    maps = [(buckets or {}).get(name) for name in key]

    def tuner(fn: Any, gpu_configs: list[triton.Config]) -> Any:
        if INTERPRET:
            chosen = [interpreter_configs[0]]
        elif not AUTOTUNE:
            chosen = gpu_configs[-1:]
        else:
            chosen = gpu_configs
        made = triton.autotune(configs=chosen, key=list(key), do_bench=_bench)(fn)
        made.cache = BucketedCache(maps)
        _TUNERS.append((made, gpu_configs, list(interpreter_configs)))
        return made

    def decorate(fn: Any) -> ByPrecision:
        return ByPrecision(tuner(fn, list(configs)), tuner(fn, list(configs[-1:])))

    return decorate


class ByPrecision:
    """One kernel's autotuners by input precision: ``narrow`` for fp16/bf16, ``fp32``."""

    def __init__(self, narrow: Any, fp32: Any) -> None:
        self.narrow = narrow
        self.fp32 = fp32

    def for_dtype(self, dtype: torch.dtype) -> Any:
        """The autotuner that launches the kernel on inputs of ``dtype``."""
        return self.fp32 if dtype == torch.float32 else self.narrow


@contextlib.contextmanager
def fresh_autotuning() -> Iterator[None]:
    """Every kernel's autotuner starts from an empty cache inside the block, so the first
    call of each shape tunes: the path where a kernel's benchmark runs precede the launch
    whose result the caller gets. On a GPU it tunes over the full config lists (whatever
    ``PLRD_AUTOTUNE`` says); under the interpreter the real ``triton.autotune`` runs over
    each kernel's interpreter configs (two or more), timed by the CPU clock. Restored after.
    It covers the kernels loaded so far: import ``plrd_kernels.triton_ops`` first for all.
    """
    saved = [(tuner, tuner.configs, tuner.cache) for tuner, _, _ in _TUNERS]
    for tuner, configs, interpreter_configs in _TUNERS:
        tuner.configs = list(interpreter_configs if INTERPRET else configs)
        tuner.cache = BucketedCache(tuner.cache.maps)
    try:
        yield
    finally:
        for tuner, configs, cache in saved:
            tuner.configs, tuner.cache = configs, cache


def tuned_choices() -> set[str]:
    """Every config the autotuners have chosen so far in this process, one line each:
    ``"<kernel> <coarse key>: <config>"`` (for benchmarks that report what was picked)."""
    return {
        f"{tuner.fn.__name__} {key}: {chosen}"
        for tuner, _, _ in _TUNERS
        for key, chosen in tuner.cache.items()
    }


def _bench(kernel_call: Callable[[], None], quantiles: Any) -> Any:
    """Autotuning timer. GPU: 5 ms warm-up and 20 ms of runs per config, not Triton's 25 +
    100 ms (a new key costs about 0.1 s of tuning per kernel). Interpreter: two timed calls
    on the CPU clock (CUDA events need a GPU; nothing compiles, so no warm-up)."""
    if INTERPRET:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            kernel_call()
            times.append(1e3 * (time.perf_counter() - start))
        times.sort()
        return [times[0], times[0], times[-1]]
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
