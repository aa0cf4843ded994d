"""Shared fixtures: the tiny Hugging Face models of ``tests.tiny_models``, the tiny family set-up
of ``tests.tiny_family`` on disk, and a private cache for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_family import build_model_dir, fixture_documents, tiny_family_config
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


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> None:
    """Converted models and parent-written text go to a cache of this test session, not the
    user's (``$PLRD_CACHE``); subprocesses inherit it."""
    monkeypatch.setenv("PLRD_CACHE", str(tmp_path_factory.getbasetemp() / "plrd-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory of a tiny random Llama + tokenizer (session-wide; treat as read-only)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"), fixture_documents())


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder of .txt, .md and .jsonl files holding the fixture documents."""
    import json

    root = tmp_path_factory.mktemp("corpus")
    docs = fixture_documents()
    for i, text in enumerate(docs[:8]):
        (root / f"doc{i:02d}.txt").write_text(text)
    for i, text in enumerate(docs[8:16]):
        (root / f"doc{i:02d}.md").write_text(text)
    with open(root / "more.jsonl", "w") as f:
        for text in docs[16:]:
            f.write(json.dumps({"text": text}) + "\n")
    return root


@pytest.fixture
def make_config(tiny_model_dir, corpus_dir, tmp_path):
    """``make_config(**overrides)``: a tiny FamilyConfig writing under this test's tmp_path."""

    def make(**overrides):
        overrides.setdefault("out", tmp_path / "family")
        return tiny_family_config(tiny_model_dir, corpus_dir, **overrides)

    return make


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """(model dir, corpus file) for tests that run the ``plrd`` command in subprocesses."""
    root = tmp_path_factory.mktemp("cli")
    docs = fixture_documents()
    model = build_model_dir(root / "model", docs)
    data = root / "corpus.txt"
    data.write_text("\n\n".join(docs))
    return model, data
