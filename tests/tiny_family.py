"""A tiny family set-up built offline: a random Llama saved with its own byte-level BPE
tokenizer (trained on the fixture text), the fixture documents, and a FamilyConfig sized to run
in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
SEQ = 32


def fixture_documents(count: int = 24) -> list[str]:
    """Deterministic English-like documents: the first ``count`` pydoc topics, trimmed."""
    from pydoc_data.topics import topics

    keys = sorted(topics)[:count]
    return [topics[k][:1500] for k in keys]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE (vocab 384) with <eos>/<pad>, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def build_model_dir(path: Path, texts: list[str]) -> Path:
    """Save a tiny random Llama (tied embeddings) and its tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_family_config(model_dir: Path, data_dir: Path, **overrides):
    """A FamilyConfig sized for the tiny model: seconds, not minutes."""
    from plrd.family.config import FamilyConfig

    values = dict(
        model=str(model_dir),
        sizes=(0.9, 0.8),
        tokens_per_stage=6 * 2 * SEQ,
        data=(str(data_dir),),
        objective="lm+kd",
        device="cpu",
        seq_len=SEQ,
        batch_size=2,
        lr=3e-3,
        calib_tokens=8 * SEQ,
        eval_tokens=8 * SEQ,
        eval_batch_size=4,
        held_out_fraction=0.2,
        checkpoint_every=2,
        progress=False,
    )
    values.update(overrides)
    values["out"] = str(values["out"])
    return FamilyConfig.of(**values)
