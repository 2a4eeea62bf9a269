"""GearCache: a transformers Cache whose layers hold GEAR-compressed K/V.

Each attention layer keeps, in one packed store (gear_kernels.store.KVStore),
- the prompt, compressed once right after prefill (prefill attention itself saw exact K/V),
  each batch row on its own with its left padding stripped, so padding enters no statistic and
  a sequence stores the same bytes alone or inside a padded batch; with sink_tokens=n, each
  row's first n tokens are kept exact instead (attention sinks);
- streamed chunks: every `buffer_size` generated tokens, compressed together as one chunk;
and beside the store the buffer: the latest generated tokens, exact. Attention sees the
store's tokens followed by the buffer, by one of three paths:
- rebuilt (the default; gear-hf's on CPU and with kernel=torch): the layer keeps the store
  decompressed as a working copy, which transformers' own attention (SDPA) reads;
- packed Triton (use_gear_attention, kernel=triton or auto on CUDA): lm_eval_gear.attention
  reads the store itself with gear_kernels.triton_attention, and no working copy is built;
- packed torch (use_gear_attention, kernel=torch): the same hand-over, read by
  gear_kernels.attention_reference.decode_attention_torch, the reference of packed Triton,
  which rebuilds the store a block of tokens at a time: what it builds beside the store stays
  one block, however long the context (gear-hf's attention=packed on CPU).

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

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from gear_kernels import GearConfig, compress, decompress, resolve_kernel
from gear_kernels.attention_reference import block_bytes
from gear_kernels.rotation import check_head_dim, hadamard_signs, rotation_of
from gear_kernels.store import STORED, KVStore, SinkPart

from .attention import PackedKV, hand_over, uses_gear_attention


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
    """One attention layer's compressed K/V (a gear_kernels KVStore) and its exact buffer.

    Positions: the prompt occupies [0, prompt_end), streamed chunk j (counting dropped ones)
    [prompt_end + j * buffer_size, ...), the buffer the rest. A sliding-window layer holds from
    `offset()` on only.
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
        self.store: KVStore | None = None
        self.decoded: tuple[torch.Tensor, torch.Tensor] | None = None  # the store rebuilt, see reconstruct()
        self.padding_checked = False  # see packed()
        self.buffer_k: torch.Tensor | None = None  # (batch, kv_heads, n, head_dim)
        self.buffer_v: torch.Tensor | None = None
        self.fed_at_once = False  # see GearCache.fed_at_once
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
        # (head_dim,) signs of the Hadamard rotation (gear_kernels.rotation), or None
        self.rotation = None if rotation_of(self.config) == "none" else \
            hadamard_signs(key_states.shape[-1], self.config.seed).to(self.device)
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
        if given is not None and bool((given > tokens).any()):
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, gear_layer: int | None = None,
               **kwargs):
        """key/value_states (batch, kv_heads, new, head_dim) -> all keys and values to attend to.

        With packed attention, the store goes to lm_eval_gear.attention under this layer's index
        (`gear_layer`, given by GearCache.update) and stand-ins come back instead.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, _position_ids(args, kwargs))
            self._compress_prompt(key_states, value_states)
            return key_states, value_states
        self._check_like_prompt(key_states)
        self.buffer_k = key_states if self.buffer_k is None else torch.cat([self.buffer_k, key_states], dim=-2)
        self.buffer_v = value_states if self.buffer_v is None else torch.cat([self.buffer_v, value_states], dim=-2)
        if self.fed_at_once:
            return self._update_at_once()
        if self.reads_packed:
            assert gear_layer is not None, "packed attention needs the layer index (GearCache.update gives it)"
            keys, values = hand_over(gear_layer, self.packed(), self.get_seq_length())
        else:
            keys, values = self.reconstruct()
        self._flush_full_buffer()  # after: the newest tokens are attended to exactly
        return keys, values

    def _update_at_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer's tokens (new ones appended) flushed as usual -> keys and values for
        GearCache.fed_at_once's mask: the store rebuilt (now with the chunks just compressed), then
        every token the buffer held before the flush, exact."""
        exact = self.buffer_k, self.buffer_v
        self._flush_full_buffer()
        if self.decoded[0] is None:
            return exact
        return tuple(torch.cat([rebuilt, kept], dim=-2) for rebuilt, kept in zip(self.decoded, exact))

    @property
    def reads_packed(self) -> bool:
        """Whether attention takes a packed path (lm_eval_gear.attention reads the store itself)
        rather than the rebuilt one; sliding layers never do: the model's sliding mask applies to them."""
        return self.packed_attention and not self.is_sliding

    def _first_visible(self, seen: int | None = None) -> int:
        """The oldest position the next query can see, after `seen` tokens (default: all so far);
        0 without a sliding window."""
        if self.sliding_window is None:
            return 0
        return max(0, (self.get_seq_length() if seen is None else seen) - self.sliding_window + 1)

    def _compress_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Each row's prompt (from its first real token, or from what a window can still see) as
        one chunk, so padding enters no statistic; the rows' chunks then go to the store. Rows
        whose prompts start at one position are compressed in one call (each row on its own
        inside it: the same bytes as alone)."""
        end = keys.shape[-2]
        store = KVStore(batch=keys.shape[0], prompt_start=self._first_visible(end), prompt_end=end,
                        rotation=self.rotation)
        rank, n_sinks = self.config.rank(prompt=True), self.config.codec.sink_tokens
        starts = [max(pad, store.prompt_start) for pad in self.pad_len.tolist()]
        cuts = [min(start + n_sinks, end) for start in starts]  # [start, cut) kept exact, the rest compressed
        spans = list(enumerate(zip(starts, cuts)))
        sinks_k = [store.to_basis(keys[row : row + 1, :, start:cut]) for row, (start, cut) in spans]
        sinks_v = [store.to_basis(values[row : row + 1, :, start:cut]) for row, (start, cut) in spans]
        rows_k, rows_v = [None] * len(starts), [None] * len(starts)
        for cut in sorted(set(cuts) - {end}):
            rows = [row for row, c in enumerate(cuts) if c == cut]
            index = torch.tensor(rows, device=keys.device)
            k, v = (self._compress(store, t.index_select(0, index)[:, :, cut:], kind, rank)
                    for t, kind in ((keys, "key"), (values, "value")))
            for j, row in enumerate(rows):
                rows_k[row], rows_v[row] = k.select_rows(torch.tensor([j])), v.select_rows(torch.tensor([j]))
        sinks = SinkPart.from_rows(sinks_k, sinks_v) if n_sinks and any(k.shape[2] for k in sinks_k) else None
        self.store = store.with_prompt(rows_k, rows_v, sinks)
        self.decoded = None if self.reads_packed else self.store.dense()

    def _flush_full_buffer(self) -> None:
        """Compress the buffer's full buffer_size tokens as chunks; drop what left the window.

        All full chunks are compressed in one call, as rows of one batch: each row is compressed
        on its own, so that is what compressing them one by one stores, with far fewer calls when
        a forward fed many tokens at once (fed_at_once)."""
        size, rank = self.config.buffer_size, self.config.rank(prompt=False)
        first = self._first_visible()  # flushing moves tokens, it does not add any
        self._evict(first)  # older tokens first: the chunks stay in position order
        full = self.buffer_k.shape[-2] // size
        k, v = self.buffer_k[:, :, : full * size], self.buffer_v[:, :, : full * size]
        self.buffer_k, self.buffer_v = self.buffer_k[:, :, full * size :], self.buffer_v[:, :, full * size :]
        gone = 0  # leading chunks already out of the window: counted, never stored (nothing will read them)
        while gone < full and self._chunk_end(self.store.dropped + self.store.chunks + gone) <= first:
            gone += 1
        self.store = self.store.with_dropped(gone)
        n = full - gone
        if not n:
            return
        k, v = (_chunk_rows(t[:, :, gone * size :], n) for t in (k, v))  # (n * batch, heads, size, head_dim)
        keys, values = self._compress(self.store, k, "key", rank), self._compress(self.store, v, "value", rank)
        batch = self.store.batch
        for j in range(n):
            rows = torch.arange(j * batch, (j + 1) * batch)
            self.store = self.store.appended(keys.select_rows(rows), values.select_rows(rows))
        if self.decoded is not None:  # decompress(chunk) is what the store's dense() gives for it, bitwise
            rebuilt = (_token_axis(decompress(keys), n), _token_axis(decompress(values), n))
            self.decoded = _joined(self.decoded, tuple(self.store.from_basis(t) for t in rebuilt))

    def _compress(self, store: KVStore, x: torch.Tensor, kind: str, rank: int):
        """x (batch, kv_heads, tokens, head_dim) -> its compressed chunk, in the store's basis."""
        return compress(store.to_basis(x), self.config, kind, rank)

    def _chunk_end(self, j: int) -> int:
        """One past the last position of streamed chunk j (counting dropped chunks)."""
        return self.store.prompt_end + (j + 1) * self.config.buffer_size

    def _evict(self, first_visible: int) -> None:
        """Drop the prompt, then whole chunks, once no future query can see any of their tokens."""
        before = self.offset()
        if self.store.has_prompt and self.store.prompt_end <= first_visible:
            self.store = self.store.without_prompt()
        old = 0
        while old < self.store.chunks and self._chunk_end(self.store.dropped + old) <= first_visible:
            old += 1
        self.store = self.store.without_chunks(old)
        if self.decoded is not None and self.offset() > before:
            self.decoded = _without_front(self.decoded, self.offset() - before)

    def _check_like_prompt(self, key_states: torch.Tensor) -> None:
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(
                f"GearCache holds {self.dtype} on {self.device} but got {key_states.dtype} on "
                f"{key_states.device}; keep the model on one dtype and device"
            )
        if key_states.shape[0] != self.store.batch:
            raise ValueError(
                f"GearCache holds a batch of {self.store.batch} but got {key_states.shape[0]}; "
                "use a fresh GearCache (or cache.reset()) for each new batch of prompts"
            )

    def offset(self) -> int:
        """The first position held: 0, unless a sliding window has dropped older tokens."""
        return self.store.offset(self.config.buffer_size)

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, held, head_dim) keys and values from offset(): the store, then the buffer.

        Pad positions of the prompt come back as zeros; the attention mask hides them. The
        store's part is rebuilt once (at prefill) and then kept, each flushed chunk's added to it
        and dropped tokens cut off it (the same values, bit for bit, as the store's dense()), so
        that a decode step on the rebuilt path costs what it costs with an exact cache;
        memory_report() counts that working copy apart (`working_bytes`).
        """
        keys, values = self.decoded
        if keys is None:
            return self.buffer_k, self.buffer_v
        return torch.cat([keys, self.buffer_k], dim=-2), torch.cat([values, self.buffer_v], dim=-2)

    def working_bytes(self) -> tuple[int, bool]:
        """Bytes built beside the store for attention, and whether only while the layer attends:
        the rebuilt path's working copy, kept between steps (see reconstruct), or the packed
        torch path's largest block (gear_kernels.attention_reference); the packed Triton path
        builds none."""
        if self.reads_packed:
            held = self.store is not None and self.kernel == "torch"
            return (block_bytes(self.store) if held else 0), True
        if self.decoded is None or self.decoded[0] is None:
            return 0, False
        return sum(t.numel() * t.element_size() for t in self.decoded), False

    def packed(self) -> PackedKV:
        """What attention reads: the layer's store, the exact buffer (the first time, with a
        request to check the model's mask against the rows' padding)."""
        check, self.padding_checked = not self.padding_checked, True
        return PackedKV(store=self.store, buffer_k=self.buffer_k, buffer_v=self.buffer_v, kernel=self.kernel,
                        check_padding=check)

    def get_seq_length(self) -> int:
        """Tokens seen (as transformers' layers count them, sliding ones included)."""
        if not self.is_initialized:
            return 0
        buffered = 0 if self.buffer_k is None else self.buffer_k.shape[-2]
        return self.store.prompt_end + self.config.buffer_size * (self.store.dropped + self.store.chunks) + buffered

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
        self.pad_len = self.pad_len[beam_idx.cpu()]
        self.store = self.store.select_rows(beam_idx)
        if self.decoded is not None and self.decoded[0] is not None:
            index = beam_idx.to(self.device)
            self.decoded = tuple(t.index_select(0, index) for t in self.decoded)
        if self.buffer_k is not None:
            self.buffer_k = self.buffer_k.index_select(0, beam_idx.to(self.device))
            self.buffer_v = self.buffer_v.index_select(0, beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.reorder_cache(torch.arange(self.store.batch).repeat_interleave(repeats))
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
        if model_config is not None and rotation_of(self.config) == "hadamard":
            check_head_dim(model_head_dim(model_config))  # now, rather than at the first forward
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # packed attention finds the layer's store by its index (transformers' layers ignore it)
        return super().update(key_states, value_states, layer_idx, *args, gear_layer=layer_idx, **kwargs)

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Empty every layer for a new batch; attention_mask: that batch's prompt mask, if padded."""
        self.pad_len = _mask_pads(attention_mask)
        for layer in self.layers:
            layer.reset()
            if isinstance(layer, GearLayer):
                layer.mask_pads = self.pad_len

    def can_feed_at_once(self) -> bool:
        """Whether fed_at_once applies: one row, every layer compressing and attending through its
        working copy (the rebuilt path; sliding windows and the packed paths feed piece by piece)."""
        layers = self.layers
        return bool(layers) and all(isinstance(layer, GearLayer) and layer.is_initialized and not layer.is_sliding
                                    and not layer.reads_packed and layer.store.batch == 1 for layer in layers)

    @contextmanager
    def fed_at_once(self, tokens: int) -> Iterator[torch.Tensor]:
        """Within: the next forward feeds `tokens` tokens at once, each attending to what it would
        attend to fed one at a time (the store, the chunks compressed before its own, its own chunk's
        tokens exactly); yields the additive (1, 1, tokens, keys) mask to give that forward as its
        attention_mask. The cache ends as it would after those tokens one at a time."""
        assert self.can_feed_at_once(), "fed_at_once needs one row on the rebuilt path without sliding windows"
        first = self.layers[0]
        held = 0 if first.decoded[0] is None else first.decoded[0].shape[-2]
        buffered = 0 if first.buffer_k is None else first.buffer_k.shape[-2]
        visible = at_once_visibility(held, buffered, tokens, self.config.buffer_size).to(first.device)
        mask = torch.zeros(visible.shape, dtype=first.dtype, device=first.device)
        mask = mask.masked_fill(~visible, torch.finfo(first.dtype).min)[None, None]
        for layer in self.layers:
            layer.fed_at_once = True
        try:
            yield mask
        finally:
            for layer in self.layers:
                layer.fed_at_once = False

    def fork(self) -> GearCache:
        """A cache in this one's state that then updates on its own: a prompt compressed once,
        continued several ways. Nothing is copied: a layer replaces what it holds rather than
        changing it in place (its KVStore is immutable; its buffer and rebuilt copy are new
        tensors at every update), so the two never see each other's updates."""
        twin = copy.copy(self)
        twin.layers = [copy.copy(layer) for layer in self.layers]
        return twin

    def memory_report(self) -> dict:
        """Bytes actually stored, per layer and in total, by component, against DynamicCache.

        `working_bytes` is apart: what attention builds beside the stores; the rebuilt path's
        working copies, kept between decode steps (a speed-up that the packed paths do
        without), add up; the packed torch path's blocks exist one layer at a time, so the
        largest counts.
        """
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
            "working_bytes": sum(r["working_bytes"] for r in per_layer if not r["transient"])
            + max((r["working_bytes"] for r in per_layer if r["transient"]), default=0),
            "per_layer": per_layer,
        }


COMPONENTS = (*STORED, "buffer")  # what a memory report counts: the stores' components, the exact buffer


def _layer_report(layer: CacheLayerMixin) -> dict:
    """One layer's stored bytes by component; exact layers count as buffer."""
    parts = dict.fromkeys(COMPONENTS, 0)
    elements = 0
    dense = 0
    if isinstance(layer, GearLayer):
        if layer.store is not None:
            for name, size in layer.store.nbytes().items():
                parts[name] += size
            elements = layer.store.elements()
            dense = elements * layer.dtype.itemsize
        exact = layer.buffer_tensors()
    else:
        exact = [t for t in (layer.keys, layer.values) if t is not None and t.numel()]
    for t in exact:
        parts["buffer"] += t.numel() * t.element_size()
        elements += t.numel()
        dense += t.numel() * t.element_size()
    working, transient = layer.working_bytes() if isinstance(layer, GearLayer) else (0, False)
    return {"bytes": parts, "elements": elements, "dense_bytes": dense, "working_bytes": working, "transient": transient}


def model_head_dim(model_config) -> int:
    """The attention head size a model's config declares (its text config's, for multimodal ones)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def at_once_visibility(held: int, buffered: int, new: int, chunk: int) -> torch.Tensor:
    """(new, keys) bool: which keys each of `new` tokens fed at once sees, the keys being the
    `held` tokens rebuilt from the store, then the rebuilt chunks this update compresses, then the
    `buffered` + `new` exact tokens of the buffer (flushed ones included).

    Token i sits at buffer position p = buffered + i, in chunk c = p // chunk; fed alone it would
    see every held token, the chunks before c compressed, and its own chunk's tokens up to itself.
    """
    total = buffered + new
    p = buffered + torch.arange(new)[:, None]  # (new, 1)
    flushed = torch.arange(total // chunk * chunk)[None, :]
    exact = torch.arange(total)[None, :]
    return torch.cat([torch.ones(new, held, dtype=torch.bool), flushed // chunk < p // chunk,
                      (exact // chunk == p // chunk) & (exact <= p)], dim=1)


def _chunk_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """(batch, heads, n * size, dim) -> (n * batch, heads, size, dim): chunk j's rows are j * batch + b."""
    batch, heads, tokens, dim = x.shape
    return x.reshape(batch, heads, n, tokens // n, dim).permute(2, 0, 1, 3, 4).reshape(n * batch, heads, -1, dim)


def _token_axis(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _chunk_rows: (n * batch, heads, size, dim) -> (batch, heads, n * size, dim)."""
    rows, heads, size, dim = x.shape
    return x.reshape(n, rows // n, heads, size, dim).permute(1, 2, 0, 3, 4).reshape(rows // n, heads, n * size, dim)


def _joined(a: tuple, b: tuple) -> tuple:
    """Keys and values a (possibly (None, None)) followed by b, on the token axis."""
    if a[0] is None:
        return b
    return torch.cat([a[0], b[0]], dim=-2), torch.cat([a[1], b[1]], dim=-2)


def _without_front(kv: tuple, n: int) -> tuple:
    """Keys and values without their first n tokens (copied, so that the memory is freed)."""
    if kv[0] is None or n >= kv[0].shape[-2]:
        return None, None
    return kv[0][:, :, n:].clone(), kv[1][:, :, n:].clone()


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
