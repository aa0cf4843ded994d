"""Tiny randomly initialised Hugging Face models, built from configs (offline).

Each builder returns a fresh fp32 model in eval mode; ``TINY_MODELS`` maps a short name to its
builder so tests can parametrize over architectures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval()


def tiny_llama(tie: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return _finish(LlamaForCausalLM(config))


def tiny_mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=32,
        tie_word_embeddings=False,
    )
    return _finish(MistralForCausalLM(config))


def tiny_qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return _finish(Qwen2ForCausalLM(config))


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64
    )
    return _finish(GPT2LMHeadModel(config))


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(4)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
    )
    return _finish(BertForMaskedLM(config))


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
}


def token_batches(count: int = 2, batch: int = 2, length: int = 16, seed: int = 0):
    """Random token-id batches [batch, length] in the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(count)]
