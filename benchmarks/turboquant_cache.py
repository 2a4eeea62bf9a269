"""TurboQuant (PyPI `fused-turboquant`, its TurboQuantMSE CPU path) as a streaming KV cache.

The peer gets GEAR's streaming, so that the two differ only in how a chunk is stored: the
prompt is compressed after prefill (prefill attends exactly), generated tokens wait in an exact
buffer of `buffer_size` and are compressed as a chunk when it fills, after the token that
filled it has attended. Attention reads the decoded keys and values; the bytes counted are the
ones TurboQuant stores (packed indices and one fp32 norm a vector).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lm_eval_gear.cache import model_head_dim


class TurboQuantLayer(DynamicLayer):
    """keys / values: (batch, kv_heads, tokens, head_dim), the decoded compressed part then the
    exact buffer (its last `buffered` tokens)."""

    def __init__(self, quantizer, buffer_size: int):
        super().__init__()
        self.quantizer, self.buffer_size = quantizer, buffer_size
        self.buffered = 0
        self.stored_bytes = 0  # indices and norms of everything compressed
        self.compressed_tokens = 0

    def update(self, key_states, value_states, *args, **kwargs):
        prefill = not self.is_initialized
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.buffered += key_states.shape[-2]
        if prefill or self.buffered >= self.buffer_size:
            self._compress_buffer()  # after attention: the newest tokens were attended to exactly
        return keys, values

    def _compress_buffer(self) -> None:
        start = self.keys.shape[-2] - self.buffered
        for name in ("keys", "values"):
            held = getattr(self, name)
            chunk = self.quantizer.encode(held[..., start:, :])
            self.stored_bytes += sum(t.numel() * t.element_size() for t in (chunk.indices, chunk.norms))
            decoded = self.quantizer.decode(chunk).to(held.dtype)
            setattr(self, name, torch.cat([held[..., :start, :], decoded], dim=-2))
        self.compressed_tokens += self.buffered
        self.buffered = 0


def turboquant_cache(model_config, bits: int, buffer_size: int = 64, seed: int = 42) -> DynamicCache:
    """A DynamicCache whose layers are TurboQuantLayers (one seeded rotation for the model)."""
    from fused_turboquant.core.quantizer import TurboQuantMSE

    quantizer = TurboQuantMSE(head_dim=model_head_dim(model_config), bits=bits, seed=seed, device="cpu")
    cache = DynamicCache(config=model_config)
    cache.layers = [TurboQuantLayer(quantizer, buffer_size) for _ in cache.layers]
    return cache


def compressed_bits(cache: DynamicCache) -> float:
    """Stored bits per compressed K or V element."""
    layers = cache.layers
    elements = sum(2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[-1] * layer.compressed_tokens
                   for layer in layers)
    return 8 * sum(layer.stored_bytes for layer in layers) / elements
