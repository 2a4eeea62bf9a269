"""The packed attention paths: decode attention straight from the store, through transformers'
AttentionInterface.

`use_gear_attention(model)` makes every attention layer call `gear_attention`. When a GearLayer
that holds compressed tokens is updated, GearCache hands the layer's store and exact buffer
over under its layer index (`hand_over`), and returns stand-in K/V (zero-stride, no memory)
for the model to pass along; `gear_attention` takes what was handed over under its module's
`layer_idx` and calls gear_kernels.decode_attention: the packed Triton path
(gear_kernels.triton_attention), which builds no full-precision copy of the compressed tokens,
or, with kernel=torch, the packed torch path (gear_kernels.attention_reference, its reference,
which rebuilds the store at each call). Without use_gear_attention a GearCache takes the
rebuilt path: it keeps a working copy that SDPA reads, and nothing here runs. Nothing rides on
the tensors: a stand-in without a hand-over (or a hand-over without its stand-in, or shapes that
disagree) raises. Everything else (prefill, sliding-window layers, which attend through the
model's own mask) goes to transformers' SDPA.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gear_kernels import decode_attention
from gear_kernels.store import KVStore

GEAR_ATTENTION = "gear"


@dataclass
class PackedKV:
    """What one layer's attention reads: its compressed store and its exact buffer."""

    store: KVStore
    buffer_k: torch.Tensor  # (batch, kv_heads, n, head_dim)
    buffer_v: torch.Tensor
    kernel: str  # "triton" or "torch"
    check_padding: bool = False  # compare the model's mask with the store's rows (a layer's first decode step)


# A layer's update and its attention run back to back in the layer's forward, in one thread.
_handed = threading.local()


def hand_over(layer_idx: int, packed: PackedKV, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave `packed` for layer `layer_idx`'s attention; -> stand-in (batch, kv_heads, seq_len, head_dim) K and V."""
    if not hasattr(_handed, "layers"):
        _handed.layers = {}
    _handed.layers[layer_idx] = (packed, seq_len)
    batch, heads, _, head_dim = packed.buffer_k.shape
    shape = (batch, heads, seq_len, head_dim)
    return packed.buffer_k.new_zeros(()).expand(shape), packed.buffer_v.new_zeros(()).expand(shape)


def _is_stand_in(t: torch.Tensor) -> bool:
    return t.numel() > 0 and all(s == 0 for s in t.stride())


def gear_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: packed decode attention, or SDPA for exact K/V."""
    layer_idx = getattr(module, "layer_idx", None)
    handed = getattr(_handed, "layers", {}).pop(layer_idx, None)
    if handed is None:
        if _is_stand_in(key):
            raise RuntimeError(
                f"gear attention: layer {layer_idx} got stand-in K/V but no compressed store was handed "
                "over for it; the GearCache and the model's layers disagree"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    packed, seq_len = handed
    if not _is_stand_in(key) or key.shape[-2] != seq_len or key.shape[0] != query.shape[0]:
        raise RuntimeError(
            f"gear attention: layer {layer_idx} was handed a store of {seq_len} tokens but got K of shape "
            f"{tuple(key.shape)}; the GearCache and the model's layers disagree"
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("GEAR's packed attention supports neither logit soft-capping nor learned sink logits (s_aux); "
                         "use the rebuilt path (kernel=torch, without use_gear_attention)")
    if packed.check_padding:
        _check_padding(attention_mask, packed.store, seq_len)
    scale = module.scaling if scaling is None else scaling
    # (batch, q_heads, q_len, head_dim); a store held rotated attends in its own basis
    out = decode_attention(query, packed.store, packed.buffer_k, packed.buffer_v, scale, kernel=packed.kernel)
    return out.transpose(1, 2).contiguous(), None


def _check_padding(attention_mask, store: KVStore, seq_len: int) -> None:
    """Refuse a batch whose mask pads rows the cache does not know are padded (its prompt was
    compressed with the pads in it). Once a layer: it reads the mask back from the device."""
    if attention_mask is None or not store.has_prompt:
        return
    last = attention_mask[:, 0, -1, -seq_len:]  # (batch, kv) what the newest query may see
    hidden = ~last if last.dtype == torch.bool else last < 0
    leading = (hidden.long().cumprod(dim=-1)).sum(dim=-1).cpu()  # masked positions before the first visible
    pads = store.prompt_end - store.prompt_lengths()
    if bool((leading > pads).any()):
        raise ValueError(
            "the attention mask pads rows that the GearCache compressed as tokens: build the cache with "
            "the prompt's attention_mask (GearCache(config, model.config, attention_mask=...))"
        )


def use_gear_attention(model) -> None:
    """Route the model's attention through gear_attention (GearCache then reads packed K/V)."""
    AttentionInterface.register(GEAR_ATTENTION, gear_attention)
    AttentionMaskInterface.register(GEAR_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GEAR_ATTENTION)


def uses_gear_attention(model_config) -> bool:
    return model_config is not None and getattr(model_config, "_attn_implementation", None) == GEAR_ATTENTION
