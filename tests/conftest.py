"""Shared fixtures over the tiny Hugging Face models of ``tests.tiny_models``."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import TINY_MODELS, tiny_gpt2, tiny_llama, token_batches


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription on a shared machine (100x on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> torch.nn.Module:
    """Each tiny architecture in turn (parametrized); ``request.param`` is its name."""
    return TINY_MODELS[request.param]()


@pytest.fixture
def llama() -> torch.nn.Module:
    """Tiny Llama with tied input/output embeddings."""
    return tiny_llama()


@pytest.fixture
def gpt2() -> torch.nn.Module:
    """Tiny GPT-2 (Conv1D layers, tied head)."""
    return tiny_gpt2()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Two random token batches [2, 16]."""
    return token_batches()
