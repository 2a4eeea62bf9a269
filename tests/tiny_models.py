"""Tiny random decoders built from configs, one per architecture family GearCache supports."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, pad_token_id=0,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    # Gemma-2 style: sliding-window layers alternate with full ones
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 24, "num_hidden_layers": 4}),
}


def tiny_model(arch: str, seed: int = 0):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra})
    # eager attention: the same kernel with and without padding masks, so runs compare exactly
    return model_cls(config).eval().to(torch.float32).requires_grad_(False), config
