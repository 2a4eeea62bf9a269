"""GearCache: a transformers Cache whose layers hold GEAR-compressed K/V.

Each attention layer keeps
- the prompt, compressed once right after prefill (prefill attention itself saw exact K/V),
  one chunk per batch row with that row's left padding stripped, so padding enters no
  statistic and a sequence stores the same bytes alone or inside a padded batch;
- streamed chunks: every `buffer_size` generated tokens, compressed together as one chunk;
- the buffer: the latest generated tokens, exact.
Attention sees the reconstruction of the chunks followed by the exact buffer. It is rebuilt for
one layer at a time, inside that layer's update, and dropped after its attention.

A row's left padding comes from the prompt's attention_mask (given to the cache, or to reset)
or, where transformers hands the cache the position ids (generate() derives them from the
mask), from those; when both are there they must agree.

Sliding-window layers (Mistral, Gemma-2/3) are compressed the same way and hold only what the
window can still see: the prompt's last `window - 1` tokens, then whole chunks are dropped once
every token of theirs has left the window (the model's sliding mask hides the older tokens of a
chunk that is partly out). Method none uses plain DynamicCache layers, so it is bit-identical
to DynamicCache.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

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


def padding_from_positions(position_ids: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """A fresh prompt's position ids (batch or 1, tokens) -> (batch,) leading pads, or None when
    they show no padding (or are not a prompt's: other shapes, offsets).

    generate() numbers a left-padded row from 0 at its first real token, so the last position id
    of row b is its real length - 1.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        return None
    if position_ids.shape[-1] != tokens or position_ids.shape[0] not in (1, batch):
        return None
    pos = position_ids.detach().long().cpu().expand(batch, tokens)
    pads = tokens - 1 - pos[:, -1]
    if not bool((pads > 0).any()) or bool((pads < 0).any()):
        return None
    real = torch.arange(tokens)[None, :] >= pads[:, None]  # (batch, tokens)
    counted = torch.arange(tokens)[None, :] - pads[:, None]
    return pads if torch.equal(pos[real], counted[real]) else None


def _position_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The position ids among a layer update's extra arguments (transformers >= 5.2x passes the
    attention layer's kwargs along; earlier releases pass nothing)."""
    for extra in (*args, kwargs.get("kwargs"), kwargs.get("cache_kwargs")):
        if isinstance(extra, dict) and isinstance(extra.get("position_ids"), torch.Tensor):
            return extra["position_ids"]
    return None


class GearLayer(CacheLayerMixin):
    """One attention layer's compressed K/V: prompt chunks, streamed chunks, exact buffer.

    Positions: the prompt occupies [0, prompt_end) and streamed chunk j (counting dropped ones)
    [prompt_end + j * buffer_size, ...). A sliding-window layer holds from `offset()` on only.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: GearConfig, mask_pads: torch.Tensor | None = None, packed_attention: bool = False,
                 sliding_window: int | None = None):
        super().__init__()
        self.config = config
        self.mask_pads = mask_pads  # (batch,) leading pads from the prompt's attention_mask, or None
        self.packed_attention = packed_attention  # the model attends with lm_eval_gear.attention
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.reset()

    def reset(self) -> None:
        self.pad_len: torch.Tensor | None = None  # (batch,) leading pads of the prompt being held
        self.prompt: list[tuple[CompressedChunk, CompressedChunk] | None] = []  # per batch row
        self.prompt_start = 0  # first prompt position held (a sliding layer keeps the last window - 1)
        self.prompt_end = 0  # padded prompt length
        self.chunks: list[tuple[CompressedChunk, CompressedChunk]] = []  # streamed, all rows
        self.dropped_chunks = 0  # streamed chunks that left a sliding window
        self.buffer_k: torch.Tensor | None = None  # (batch, kv_heads, n, head_dim)
        self.buffer_v: torch.Tensor | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            position_ids: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kernel = resolve_kernel(self.config.kernel, self.device)
        if self.config.kernel == "triton" and not self.packed_attention:
            raise ValueError(
                "kernel=triton attends straight from the packed cache: call "
                "lm_eval_gear.use_gear_attention(model) before building the GearCache"
            )
        self.pad_len = self._prompt_padding(key_states.shape[0], key_states.shape[-2], position_ids)
        self.is_initialized = True

    def _prompt_padding(self, batch: int, tokens: int, position_ids: torch.Tensor | None) -> torch.Tensor:
        """(batch,) leading pads of the prompt, from the mask and the position ids."""
        given = self.mask_pads
        if given is not None and given.shape[0] != batch:
            if batch % given.shape[0]:
                raise ValueError(
                    f"GearCache got an attention_mask for batch {given.shape[0]} but the model runs batch "
                    f"{batch}, which is not a multiple of it; pass the mask of the inputs the model runs"
                )
            # generate() repeats each prompt in place for beams and num_return_sequences
            given = given.repeat_interleave(batch // given.shape[0])
        if given is not None and bool((given >= tokens).any()) and tokens > 0:
            raise ValueError(
                f"GearCache's attention_mask pads a row by {int(given.max())} but the prompt has {tokens} "
                "tokens; pass the mask of the same inputs"
            )
        seen = padding_from_positions(position_ids, batch, tokens)
        if given is None:
            return torch.zeros(batch, dtype=torch.long) if seen is None else seen
        if seen is not None and not torch.equal(seen, given):
            raise ValueError(
                f"GearCache's attention_mask gives the rows {given.tolist()} leading pads, but the model's "
                f"position ids say {seen.tolist()}; pass the mask of the same inputs (or cache.reset(attention_mask))"
            )
        return given

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states (batch, kv_heads, new, head_dim) -> all keys and values to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, _position_ids(args, kwargs))
            self._compress_prompt(key_states, value_states)
            return key_states, value_states
        self._check_like_prompt(key_states)
        self.buffer_k = key_states if self.buffer_k is None else torch.cat([self.buffer_k, key_states], dim=-2)
        self.buffer_v = value_states if self.buffer_v is None else torch.cat([self.buffer_v, value_states], dim=-2)
        if self.packed_attention and not self.is_sliding:
            keys, values = stand_in(self.packed(), self.get_seq_length())
        else:  # sliding layers: the model's sliding mask applies to the reconstruction
            keys, values = self.reconstruct()
        self._flush_full_buffer()  # after: the newest tokens are attended to exactly
        return keys, values

    def _first_visible(self) -> int:
        """The oldest position the next query can see (0 without a sliding window)."""
        if self.sliding_window is None:
            return 0
        return max(0, self.get_seq_length() - self.sliding_window + 1)

    def _compress_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.prompt_end = keys.shape[-2]
        self.prompt_start = self._first_visible()
        rank = self.config.rank_prompt
        for row, pad in enumerate(self.pad_len.tolist()):
            start = max(pad, self.prompt_start)
            k, v = keys[row : row + 1, :, start:], values[row : row + 1, :, start:]
            self.prompt.append(
                None if k.shape[-2] == 0 else (compress(k, self.config, "key", rank), compress(v, self.config, "value", rank))
            )

    def _chunk_end(self, j: int) -> int:
        """One past the last position of streamed chunk j (counting dropped chunks)."""
        return self.prompt_end + (j + 1) * self.config.buffer_size

    def _flush_full_buffer(self) -> None:
        """Compress each full buffer_size tokens of the buffer as a chunk; drop what left the window."""
        size, rank = self.config.buffer_size, self.config.rank_chunk
        first = self._first_visible()  # flushing moves tokens, it does not add any
        while self.buffer_k.shape[-2] >= size:
            k, v = self.buffer_k[:, :, :size], self.buffer_v[:, :, :size]
            self.buffer_k, self.buffer_v = self.buffer_k[:, :, size:], self.buffer_v[:, :, size:]
            self._evict(first)  # older tokens first: the chunk list stays in position order
            if self._chunk_end(self.dropped_chunks + len(self.chunks)) <= first:
                self.dropped_chunks += 1  # already out of the window: nothing will read it
                continue
            self.chunks.append((compress(k, self.config, "key", rank), compress(v, self.config, "value", rank)))
        self._evict(first)

    def _evict(self, first_visible: int) -> None:
        """Drop the prompt, then whole chunks, once no future query can see any of their tokens."""
        if self.prompt_start < self.prompt_end <= first_visible:
            self.prompt = [None] * len(self.prompt)
            self.prompt_start = self.prompt_end
        while self.chunks and self._chunk_end(self.dropped_chunks) <= first_visible:
            self.chunks.pop(0)
            self.dropped_chunks += 1

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

    def offset(self) -> int:
        """The first position held: 0, unless a sliding window has dropped older tokens."""
        if self.prompt_start < self.prompt_end:
            return self.prompt_start
        return self.prompt_end + self.dropped_chunks * self.config.buffer_size

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, held, head_dim) keys and values from offset(): decompressed chunks, then the buffer.

        Pad positions of the prompt come back as zeros; the attention mask hides them.
        """
        ref = self.buffer_k
        shape = (len(self.prompt), ref.shape[1], self.prompt_end - self.prompt_start, ref.shape[-1])
        prompt_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        prompt_v = torch.zeros_like(prompt_k)
        for row, (pad, chunk) in enumerate(zip(self.pad_len.tolist(), self.prompt)):
            if chunk is not None:
                start = max(pad, self.prompt_start) - self.prompt_start
                prompt_k[row, :, start:] = decompress(chunk[0])[0]
                prompt_v[row, :, start:] = decompress(chunk[1])[0]
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
        """Tokens seen (as transformers' layers count them, sliding ones included)."""
        if not self.is_initialized:
            return 0
        buffered = 0 if self.buffer_k is None else self.buffer_k.shape[-2]
        return self.prompt_end + self.config.buffer_size * (self.dropped_chunks + len(self.chunks)) + buffered

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.2x passes cache_position
            query_length = query_length.shape[0]
        if not self.is_initialized:
            return query_length, 0
        offset = self.offset()
        return self.get_seq_length() - offset + query_length, offset

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

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
        elif self.mask_pads is not None:
            self.mask_pads = self.mask_pads.repeat_interleave(repeats)

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

    config: the GEAR settings, a GearConfig or a mapping of its options ({"method": "gear"}).
    model_config: the model's config; with it, the cache checks the architecture and gives
    sliding-window layers their window (without it every layer is a full-attention GearLayer).
    attention_mask: the prompt's (batch, tokens) mask when the batch is left padded, so padding
    enters no statistic; generate() with num_beams or num_return_sequences repeats it per row.

    One cache serves one generate call (or one prompt and its continuation); reset() empties it
    for another batch (reset(attention_mask) for a padded one).
    """

    def __init__(self, config: GearConfig | Mapping[str, Any], model_config=None,
                 attention_mask: torch.Tensor | None = None):
        self.config = _as_config(config)
        self.pad_len = _mask_pads(attention_mask)
        self.packed_attention = uses_gear_attention(model_config)
        if model_config is None:
            super().__init__(layer_class_to_replicate=self._new_layer)
        else:
            super().__init__(layers=[self._compressing(layer, model_config) for layer in _dynamic_layers(model_config)])

    def _new_layer(self, sliding_window: int | None = None) -> CacheLayerMixin:
        if not self.config.compresses:
            return DynamicLayer()
        return GearLayer(self.config, self.pad_len, self.packed_attention, sliding_window)

    def _compressing(self, layer: CacheLayerMixin, model_config) -> CacheLayerMixin:
        """The layer GearCache uses where DynamicCache would use `layer`."""
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(
                f"GearCache cannot compress {type(layer).__name__} layers of {type(model_config).__name__}; "
                "it supports full-attention and sliding-window attention layers"
            )
        if not self.config.compresses:
            return layer  # method none: DynamicCache's own layers
        return self._new_layer(getattr(layer, "sliding_window", None))

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Empty every layer for a new batch; attention_mask: that batch's prompt mask, if padded."""
        self.pad_len = _mask_pads(attention_mask)
        for layer in self.layers:
            layer.reset()
            if isinstance(layer, GearLayer):
                layer.mask_pads = self.pad_len

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


def _as_config(config: Any) -> GearConfig:
    if isinstance(config, GearConfig):
        return config
    if isinstance(config, Mapping):
        return GearConfig.from_options(config)
    raise TypeError(
        f"GearCache takes a GearConfig or a mapping of its options (e.g. {{'method': 'gear', 'bits': 2}}), "
        f"not {type(config).__name__}"
    )


def _mask_pads(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else left_padding(attention_mask).cpu()


def _dynamic_layers(model_config) -> list[CacheLayerMixin]:
    """The layers transformers' DynamicCache would build for this model."""
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"GearCache supports decoder-only models; {type(model_config).__name__} is encoder-decoder")
    return DynamicCache(config=model_config).layers
