"""Tiny random decoders built from configs, one per architecture family GearCache supports, and
the helpers the cache tests run them with."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lm_eval_gear.compat import cache_kwarg

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
    # Gemma-3 style: five sliding-window layers to one full one
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 24, "num_hidden_layers": 6}),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    """(model, config) of a tiny random `arch` decoder; overrides: config fields."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    # eager attention: the same kernel with and without padding masks, so runs compare exactly
    return model_cls(config).eval().to(torch.float32).requires_grad_(False), config


def generate(model, ids, cache=None, mask=None, **kwargs):
    """Greedy generate (12 new tokens unless told) through `cache` (None: transformers' own)."""
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, **kwargs}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def prompts(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    """(batch, tokens) random token ids, never the pad id 0."""
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d token rows -> (ids, mask), each row left padded with 0 to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def assert_same_parts(a, b, positions: bool = True) -> None:
    """Two store sides (gear_kernels.store.Packed) hold the same segments and values, field by
    field (outlier indices may be kept in a wider type when the other side has a longer segment).
    positions=False: the segments' first positions may differ (the same tokens behind other padding)."""
    assert type(a) is type(b)
    assert (a.dtype, a.head_dim, a.quantizer, a.fields) == (b.dtype, b.head_dim, b.quantizer, b.fields)
    for name in ("rows", "tokens", "groups", *(("starts",) if positions else ())):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.data.keys() == b.data.keys() == a.counts.keys() == b.counts.keys()
    for name in a.data:
        assert torch.equal(a.counts[name], b.counts[name]) and torch.equal(a.offsets[name], b.offsets[name]), name
        x, y = a.data[name], b.data[name]
        same = torch.equal(x.long(), y.long()) if name == "outlier_index" else torch.equal(x, y)
        assert same and (x.dtype == y.dtype or name == "outlier_index"), name
