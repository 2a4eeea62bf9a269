"""Decode attention straight from the packed cache, through transformers' AttentionInterface.

`use_gear_attention(model)` makes every attention layer call `gear_attention`. For a GearLayer
that holds compressed chunks, the layer's update returns stand-in K/V (zero-stride, no memory)
that carry the layer's segments; `gear_attention` hands those to gear_kernels.decode_attention,
so no full-precision copy of the compressed tokens is built. Everything else (prefill, exact
sliding-window layers) goes to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gear_kernels import decode_attention

GEAR_ATTENTION = "gear"


@dataclass
class PackedKV:
    """What one layer's attention reads: compressed segments in position order + exact buffer."""

    key_segments: list
    value_segments: list
    buffer_k: torch.Tensor  # (batch, kv_heads, n, head_dim)
    buffer_v: torch.Tensor
    kernel: str  # "triton" or "torch"


def stand_in(packed: PackedKV, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-stride (batch, kv_heads, seq_len, head_dim) tensors carrying `packed` for gear_attention."""
    batch, heads, _, head_dim = packed.buffer_k.shape
    shape = (batch, heads, seq_len, head_dim)
    keys = packed.buffer_k.new_zeros(()).expand(shape)
    values = packed.buffer_v.new_zeros(()).expand(shape)
    keys.gear_packed = packed
    return keys, values


def gear_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: packed decode attention, or SDPA for exact K/V."""
    packed = getattr(key, "gear_packed", None)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("GEAR's packed attention supports neither logit soft-capping nor attention sinks; use kernel=torch")
    scale = module.scaling if scaling is None else scaling
    out = decode_attention(query, packed.key_segments, packed.value_segments, packed.buffer_k, packed.buffer_v,
                           scale, kernel=packed.kernel)  # (batch, q_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def use_gear_attention(model) -> None:
    """Route the model's attention through gear_attention (GearCache then reads packed K/V)."""
    AttentionInterface.register(GEAR_ATTENTION, gear_attention)
    AttentionMaskInterface.register(GEAR_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GEAR_ATTENTION)


def uses_gear_attention(model_config) -> bool:
    return model_config is not None and getattr(model_config, "_attn_implementation", None) == GEAR_ATTENTION
