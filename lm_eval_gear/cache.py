"""GearCache: a transformers Cache whose layers hold GEAR-compressed K/V.

Each attention layer keeps
- the prompt, compressed once right after prefill (prefill attention itself saw exact K/V),
  one chunk per batch row with that row's left padding stripped, so padding enters no
  statistic and a sequence stores the same bytes alone or inside a padded batch;
- streamed chunks: every `buffer_size` generated tokens, compressed together as one chunk;
- the buffer: the latest generated tokens, exact.
Attention sees the reconstruction of the chunks followed by the exact buffer. It is rebuilt for
one layer at a time, inside that layer's update, and dropped after its attention.

Sliding-window layers (Gemma-2/3 style) are kept exact, as transformers' own sliding layers:
they hold at most a window of tokens, so compressing them would save little. Method none
uses plain DynamicCache layers, so it is bit-identical to DynamicCache.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from gear_kernels import CompressedChunk, GearConfig, decompress, resolve_kernel
from gear_kernels.dispatch import compress

from .attention import PackedKV, stand_in, uses_gear_attention

def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) 0/1 mask -> (batch,) count of leading pad positions; rejects other padding."""
    mask = attention_mask.bool()
    pads = (~mask).long().cumprod(dim=-1).sum(dim=-1)  # leading zeros per row
    if not torch.equal(mask.sum(dim=-1) + pads, torch.full_like(pads, mask.shape[-1])):
        raise ValueError(
            "GearCache supports left padding only (zeros before the tokens in attention_mask); "
            "pad the batch on the left (tokenizer.padding_side = 'left')"
        )
    return pads


class GearLayer(CacheLayerMixin):
    """One attention layer's compressed K/V: prompt chunks, streamed chunks, exact buffer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config: GearConfig, pad_len: torch.Tensor | None = None, packed_attention: bool = False):
        super().__init__()
        self.config = config
        self.pad_len = pad_len  # (batch,) leading pad positions of the prompt, or None
        self.packed_attention = packed_attention  # the model attends with lm_eval_gear.attention
        self.reset()

    def reset(self) -> None:
        self.prompt: list[tuple[CompressedChunk, CompressedChunk] | None] = []  # per batch row
        self.prompt_tokens = 0  # padded prompt length
        self.chunks: list[tuple[CompressedChunk, CompressedChunk]] = []  # streamed, all rows
        self.buffer_k: torch.Tensor | None = None  # (batch, kv_heads, n, head_dim)
        self.buffer_v: torch.Tensor | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kernel = resolve_kernel(self.config.kernel, self.device)
        if self.config.kernel == "triton" and not self.packed_attention:
            raise ValueError(
                "kernel=triton attends straight from the packed cache: call "
                "lm_eval_gear.use_gear_attention(model) before building the GearCache"
            )
        batch = key_states.shape[0]
        if self.pad_len is None:
            self.pad_len = torch.zeros(batch, dtype=torch.long)
        elif self.pad_len.shape[0] != batch:
            raise ValueError(
                f"GearCache got an attention_mask for batch {self.pad_len.shape[0]} but the model "
                f"runs batch {batch}; pass the mask of the same inputs"
            )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (batch, kv_heads, new, head_dim) -> all keys and values to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._compress_prompt(key_states, value_states)
            return key_states, value_states
        self._check_like_prompt(key_states)
        self.buffer_k = key_states if self.buffer_k is None else torch.cat([self.buffer_k, key_states], dim=-2)
        self.buffer_v = value_states if self.buffer_v is None else torch.cat([self.buffer_v, value_states], dim=-2)
        if self.packed_attention:
            keys, values = stand_in(self.packed(), self.get_seq_length())
        else:
            keys, values = self.reconstruct()
        self._flush_full_buffer()  # after: the newest tokens are attended to exactly
        return keys, values

    def _compress_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.prompt_tokens = keys.shape[-2]
        rank = self.config.rank_prompt
        for row, pad in enumerate(self.pad_len.tolist()):
            k, v = keys[row : row + 1, :, pad:], values[row : row + 1, :, pad:]
            self.prompt.append(
                None if k.shape[-2] == 0 else (compress(k, self.config, "key", rank), compress(v, self.config, "value", rank))
            )

    def _flush_full_buffer(self) -> None:
        size, rank = self.config.buffer_size, self.config.rank_chunk
        while self.buffer_k.shape[-2] >= size:
            k, v = self.buffer_k[:, :, :size], self.buffer_v[:, :, :size]
            self.chunks.append((compress(k, self.config, "key", rank), compress(v, self.config, "value", rank)))
            self.buffer_k, self.buffer_v = self.buffer_k[:, :, size:], self.buffer_v[:, :, size:]

    def _check_like_prompt(self, key_states: torch.Tensor) -> None:
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(
                f"GearCache holds {self.dtype} on {self.device} but got {key_states.dtype} on "
                f"{key_states.device}; keep the model on one dtype and device"
            )
        if key_states.shape[0] != len(self.prompt):
            raise ValueError(
                f"GearCache holds a batch of {len(self.prompt)} but got {key_states.shape[0]}; "
                "use a fresh GearCache (or cache.reset()) for each new batch of prompts"
            )

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, seq, head_dim) keys and values: decompressed chunks, then the buffer.

        Pad positions of the prompt come back as zeros; the attention mask hides them.
        """
        ref = self.buffer_k
        shape = (len(self.prompt), ref.shape[1], self.prompt_tokens, ref.shape[-1])
        prompt_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        prompt_v = torch.zeros_like(prompt_k)
        for row, (pad, chunk) in enumerate(zip(self.pad_len.tolist(), self.prompt)):
            if chunk is not None:
                prompt_k[row, :, pad:] = decompress(chunk[0])[0]
                prompt_v[row, :, pad:] = decompress(chunk[1])[0]
        keys = [prompt_k] + [decompress(k) for k, _ in self.chunks] + [self.buffer_k]
        values = [prompt_v] + [decompress(v) for _, v in self.chunks] + [self.buffer_v]
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def packed(self) -> PackedKV:
        """The segments attention reads: per-row prompt chunks, streamed chunks, the buffer."""
        prompt = [[None if p is None else p[i] for p in self.prompt] for i in (0, 1)]
        return PackedKV(
            key_segments=[prompt[0]] + [k for k, _ in self.chunks],
            value_segments=[prompt[1]] + [v for _, v in self.chunks],
            buffer_k=self.buffer_k, buffer_v=self.buffer_v, kernel=self.kernel,
        )

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        buffered = 0 if self.buffer_k is None else self.buffer_k.shape[-2]
        return self.prompt_tokens + self.config.buffer_size * len(self.chunks) + buffered

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.2x passes cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes the old row beam_idx[i]."""
        if not self.is_initialized:
            return
        order = beam_idx.tolist()
        self.prompt = [self.prompt[i] for i in order]
        self.pad_len = self.pad_len[beam_idx.cpu()]
        self.chunks = [(k.select_rows(beam_idx), v.select_rows(beam_idx)) for k, v in self.chunks]
        if self.buffer_k is not None:
            self.buffer_k = self.buffer_k.index_select(0, beam_idx.to(self.device))
            self.buffer_v = self.buffer_v.index_select(0, beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.reorder_cache(torch.arange(len(self.prompt)).repeat_interleave(repeats))
        elif self.pad_len is not None:
            self.pad_len = self.pad_len.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GearCache cannot crop compressed tokens (assisted generation is not supported)")

    def offload(self):
        raise NotImplementedError("GearCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("GearCache does not support offloading")

    def stored(self) -> list[CompressedChunk]:
        """Every compressed chunk this layer holds."""
        prompt = [c for pair in self.prompt if pair is not None for c in pair]
        return prompt + [c for pair in self.chunks for c in pair]

    def buffer_tensors(self) -> list[torch.Tensor]:
        return [] if self.buffer_k is None else [self.buffer_k, self.buffer_v]


class GearCache(Cache):
    """A GEAR-compressed KV cache that `model.generate()` and `model(...)` accept.

    config: the GEAR settings. model_config: the model's config; with it, the cache checks the
    architecture and keeps sliding-window layers exact (without it every layer is a GearLayer,
    which is right for full-attention models). attention_mask: the prompt's (batch, tokens)
    mask when the batch is left padded, so padding enters no statistic.

    One cache serves one generate call (or one prompt and its continuation); call reset() to
    use it for another.
    """

    def __init__(self, config: GearConfig, model_config=None, attention_mask: torch.Tensor | None = None):
        self.config = config
        self.pad_len = None if attention_mask is None else left_padding(attention_mask).cpu()
        self.packed_attention = uses_gear_attention(model_config)
        if model_config is None:
            super().__init__(layer_class_to_replicate=self._new_layer)
        else:
            super().__init__(layers=[self._compressing(layer, model_config) for layer in _dynamic_layers(model_config)])

    def _new_layer(self) -> CacheLayerMixin:
        if not self.config.compresses:
            return DynamicLayer()
        return GearLayer(self.config, self.pad_len, self.packed_attention)

    def _compressing(self, layer: CacheLayerMixin, model_config) -> CacheLayerMixin:
        """The layer GearCache uses where DynamicCache would use `layer`."""
        if type(layer) is DynamicLayer:
            return self._new_layer()
        if isinstance(layer, DynamicSlidingWindowLayer):
            return layer
        raise ValueError(
            f"GearCache cannot compress {type(layer).__name__} layers of {type(model_config).__name__}; "
            "it supports full-attention and sliding-window attention layers"
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def memory_report(self) -> dict:
        """Bytes actually stored, per layer and in total, by component, against DynamicCache."""
        per_layer = [_layer_report(layer) for layer in self.layers]
        total = {c: sum(r["bytes"][c] for r in per_layer) for c in COMPONENTS}
        elements = sum(r["elements"] for r in per_layer)
        dense = sum(r["dense_bytes"] for r in per_layer)
        stored = sum(total.values())
        return {
            "bytes": total,
            "total_bytes": stored,
            "dense_bytes": dense,
            "elements": elements,
            "bits_per_element": 8 * stored / elements if elements else 0.0,
            "ratio": dense / stored if stored else 1.0,
            "per_layer": per_layer,
        }


COMPONENTS = ("codes", "scales", "outliers", "lowrank", "buffer")


def _layer_report(layer: CacheLayerMixin) -> dict:
    """One layer's stored bytes by component; exact layers count as buffer."""
    parts = dict.fromkeys(COMPONENTS, 0)
    elements = 0
    dense = 0
    if isinstance(layer, GearLayer):
        for chunk in layer.stored():
            for name, size in chunk.nbytes(by_component=True).items():
                parts["buffer" if name == "exact" else name] += size
            elements += math.prod(chunk.shape)
            dense += math.prod(chunk.shape) * chunk.dtype.itemsize
        exact = layer.buffer_tensors()
    else:
        exact = [t for t in (layer.keys, layer.values) if t is not None and t.numel()]
    for t in exact:
        parts["buffer"] += t.numel() * t.element_size()
        elements += t.numel()
        dense += t.numel() * t.element_size()
    return {"bytes": parts, "elements": elements, "dense_bytes": dense}


def _dynamic_layers(model_config) -> list[CacheLayerMixin]:
    """The layers transformers' DynamicCache would build for this model."""
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"GearCache supports decoder-only models; {type(model_config).__name__} is encoder-decoder")
    return DynamicCache(config=model_config).layers
