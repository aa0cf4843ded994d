"""Set-up for the pytest-benchmark suite: ``python -m pytest benchmarks/``.

* Every saved result carries the machine (CPU model, cores, torch threads, GPU), the library
  versions, the date and the load average before and after the run (the CPU cases are often
  measured on shared machines; the load tells how noisy the numbers may be).
* Devices: CPU cases always run; CUDA cases are skipped without a CUDA device.
* Model fixtures: a SmolLM2-135M-shaped random Llama (the parent), its decomposed members and,
  for each member, a dense Llama of the same depth and parameter count with smaller widths.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pytest
import torch
from bench_common import build_llama, llama_config, same_size_dense_config
from shapes import KEEPS, SMOLLM2_CONFIG

# --------------------------------------------------------------------------- machine metadata


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC", ...), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


_LOAD_AT_START = pytest.StashKey[Any]()


def pytest_benchmark_update_machine_info(config: Any, machine_info: dict) -> None:
    machine_info["cpu_model"] = cpu_model()
    machine_info["cpu_cores"] = usable_cores()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    )
    machine_info["versions"] = {
        name: _version(name)
        for name in ("torch", "triton", "transformers", "pytest-benchmark", "plrd")
    }
    machine_info["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    machine_info["loadavg_at_start"] = config.stash.get(_LOAD_AT_START, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the benchmark run (default: torch's own choice)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LOAD_AT_START] = _loadavg()
    threads = config.getoption("--bench-threads", None)
    if threads:
        torch.set_num_threads(threads)


def pytest_benchmark_update_json(config: Any, benchmarks: list, output_json: dict) -> None:
    output_json["machine_info"]["loadavg_at_end"] = _loadavg()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def set_backend(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``set_backend(name)`` sets ``PLRD_BACKEND`` for the duration of one benchmark."""

    def apply(name: str) -> None:
        monkeypatch.setenv("PLRD_BACKEND", name)

    return apply


@pytest.fixture(scope="session")
def smollm2_parent() -> torch.nn.Module:
    """The dense SmolLM2-135M-shaped parent (random weights)."""
    return build_llama(llama_config())


@pytest.fixture(scope="session")
def smollm2_members(smollm2_parent: torch.nn.Module) -> dict[float, torch.nn.Module]:
    """{keep: member}: the parent decomposed progressively to each kept fraction of its size.

    Each member is decomposed from the previous one (dense → 0.75 by SVD, then QR-core
    re-truncations), as the progressive method does; plain SVD is used because the weights are
    random and only speed is measured.
    """
    import plrd

    parent_params = plrd.count_parameters(smollm2_parent)
    members: dict[float, torch.nn.Module] = {}
    current, current_params = smollm2_parent, parent_params
    for keep in sorted(KEEPS, reverse=True):
        member = copy.deepcopy(current)
        plrd.decompose(
            member, keep=keep * parent_params / current_params, method="svd", progress=False
        )
        members[keep] = member.eval()
        current, current_params = member, plrd.count_parameters(member)
    return members


def _dense_like(
    members: dict[float, torch.nn.Module], keeps: tuple[float, ...], hidden: int | None
) -> dict[float, torch.nn.Module]:
    import plrd

    models = {}
    for keep in keeps:
        target = plrd.count_parameters(members[keep])
        model = build_llama(same_size_dense_config(target, hidden=hidden))
        count = plrd.count_parameters(model)
        if abs(count - target) > 0.02 * target:
            raise ValueError(f"same-size dense model has {count} parameters, member {target}")
        models[keep] = model
    return models


@pytest.fixture(scope="session")
def same_size_dense(
    smollm2_members: dict[float, torch.nn.Module],
) -> dict[float, torch.nn.Module]:
    """{keep: dense model with the member's parameter count (within 2%) at the same depth}.

    Hidden and MLP widths shrink together (see ``same_size_dense_config``).
    """
    return _dense_like(smollm2_members, tuple(smollm2_members), hidden=None)


@pytest.fixture(scope="session")
def same_width_dense(
    smollm2_members: dict[float, torch.nn.Module],
) -> dict[float, torch.nn.Module]:
    """{0.5: dense model of the keep-0.5 member's size with the parent's hidden width (576)}.

    Only the MLP shrinks, so embeddings, output head, attention and norms cost what they cost
    in the member: the comparison isolates the factored layers.
    """
    return _dense_like(smollm2_members, (0.5,), hidden=SMOLLM2_CONFIG["hidden_size"])
