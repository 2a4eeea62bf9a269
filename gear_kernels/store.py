"""One layer's compressed K and V, as a cache holds them and attention reads them.

A layer's stored tokens come in these parts, in position order (DESIGN.md section 6):

- optionally each row's first prompt tokens, kept exact (a SinkPart: attention sinks,
  sink_tokens);
- the rest of the prompt, compressed once after prefill row by row, each row without its
  left padding (and, in a sliding-window layer, without what the window can no longer see):
  a PromptPart packs the rows back to back on one token axis, row b holding tokens
  [cu[b], cu[b + 1]), as flash-attn's varlen interface does with cu_seqlens;
- the streamed chunks, every `chunk_tokens` tokens of all rows compressed together: a
  StreamPart holds them as uniform tensors with a chunk axis, appended in order.

A part keeps exactly what `compress` stored for its chunks (packed codes, fp16 scales and zero
points, outliers, low-rank factors and their scales), concatenated, plus per-row token counts. Its
`dense()` rebuilds the tokens for the torch path in a fixed number of tensor operations, with no
Python loop over rows or chunks, and computes every entry as `chunk.decompress` does, bit for
bit, so a row reconstructs alike alone or inside a batch.

Shapes: H kv heads, D head_dim, W = packing.packed_length(D, bits) bytes a token, B rows. Keys
and values are parts of their own, so each has its own bits (key_bits, value_bits).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .chunk import CompressedChunk, lowrank_product
from .lowrank import factor
from .outliers import index_dtype
from .packing import unpack
from .quantize import dequantize_entries

COMPONENTS = {  # as CompressedChunk.COMPONENTS, plus the outliers' bucket offsets
    "codes": ("codes",),
    "scales": ("scale", "zero"),
    "outliers": ("outlier_values", "outlier_index", "outlier_bucket"),
    "lowrank": ("lowrank_a", "lowrank_b", "lowrank_a_scale", "lowrank_b_scale"),
}
STORED = (*COMPONENTS, "sinks")  # what a KVStore's nbytes() reports
# Outliers are bucketed by BUCKET tokens when they are stored: a decode tile (a multiple of
# BUCKET tokens, at a multiple of BUCKET) finds its outliers at two offsets, with no search.
BUCKET = 16


def buckets(index: torch.Tensor, tokens: int, head_dim: int) -> torch.Tensor:
    """Sorted flat outlier indices (..., k) of slices of `tokens` tokens -> (..., ceil(tokens /
    BUCKET) + 1) int32: entry j counts the outliers of tokens before j * BUCKET (the last, all)."""
    bounds = torch.arange(-(-tokens // BUCKET) + 1, device=index.device) * (BUCKET * head_dim)
    bounds = bounds.clamp(max=tokens * head_dim).expand(*index.shape[:-1], -1).contiguous()
    return torch.searchsorted(index.long().contiguous(), bounds).to(torch.int32)


def _tensors(part) -> list[torch.Tensor]:
    return [getattr(part, f.name) for f in fields(part) if isinstance(getattr(part, f.name), torch.Tensor)]


def _stored_bytes(part) -> dict[str, int]:
    """Bytes of the stored tensors, by component (per-row counts are a few integers: not counted)."""
    nbytes = {}
    for names in COMPONENTS.values():
        for name in names:
            t = getattr(part, name)
            nbytes[name] = 0 if t is None else t.numel() * t.element_size()
    return {c: sum(nbytes[n] for n in names) for c, names in COMPONENTS.items()}


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [starts[i], starts[i] + counts[i]) (1-d CPU tensors), without a loop."""
    total = int(counts.sum())
    begins = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - begins, counts) + torch.arange(total)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """(B,) counts -> (B,) where each row's entries begin (exclusive cumulative sum)."""
    return torch.cumsum(counts, 0) - counts


def _finish(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 D + L -> the model dtype, as chunk.decompress: clamped first, since the scale is
    rounded up and a group's top code may land a little beyond the dtype's largest value."""
    finite = torch.finfo(dtype).max
    return out.clamp(-finite, finite).to(dtype)


@dataclass
class PromptPart:
    """The prompt's compressed K (or V) of every row, packed back to back.

    lengths (B,) tokens of each row (0 for a row of padding only), on the CPU.
    codes (H, N, W) uint8, N = lengths.sum().
    scale, zero fp16: (H, D, NG) when per_channel, row b's groups one after the other, each of
    `group_sizes[b]` tokens (the last may be shorter); else (H, N, ceil(D / group)).
    outlier_values (H, n_out) in the model dtype (or fp16) and outlier_index (H, n_out), row b's
    `outlier_counts[b]` entries one after the other, each a flat index t * D + d into that
    row's own (tokens, D), ascending; or None.
    outlier_bucket (H, sum(ceil(lengths / BUCKET) + 1)) int32: row b's buckets (see buckets())
    one after the other, counting from the row's first outlier.
    lowrank_a (H, N, r) and lowrank_b (B, H, D, r) fp16 or int8, or None; a row shorter than r
    has zero columns beyond its own rank (they add exactly nothing). int8 factors:
    lowrank_a_scale and lowrank_b_scale (B, H, 1, r) fp16, row b's column scales.
    """

    dtype: torch.dtype
    head_dim: int
    bits: int
    per_channel: bool
    group: int
    lengths: torch.Tensor
    group_sizes: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    outlier_counts: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    outlier_bucket: torch.Tensor | None = None
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None
    lowrank_a_scale: torch.Tensor | None = None
    lowrank_b_scale: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: list[CompressedChunk | None]) -> PromptPart:
        """One batch-1 chunk (1, H, tokens, D) per row, None for a row without tokens."""
        present = [c for c in rows if c is not None]
        assert present, "a prompt part needs at least one row with tokens"
        ref = present[0]
        _, heads, _, dim = ref.shape
        for c in present:
            assert c.exact is None, "the store holds compressed chunks only (method none keeps DynamicCache layers)"
            assert (c.shape[0], c.shape[1], c.shape[3], c.dtype, c.bits, c.per_channel) == \
                (1, heads, dim, ref.dtype, ref.bits, ref.per_channel), "prompt rows must share layout and dtype"
        lengths = torch.tensor([0 if c is None else c.shape[2] for c in rows], dtype=torch.long)
        group_sizes = torch.tensor([ref.group if c is None else c.group for c in rows], dtype=torch.long)
        cat = lambda name, dim_: torch.cat([getattr(c, name)[0] for c in present], dim=dim_)  # noqa: E731
        kwargs = dict(codes=cat("codes", 1), scale=cat("scale", -1 if ref.per_channel else 1),
                      zero=cat("zero", -1 if ref.per_channel else 1))
        if ref.outlier_values is not None:
            wide = index_dtype(int(lengths.max()) * dim)  # what the longest row's chunk used
            kwargs.update(
                outlier_counts=torch.tensor([0 if c is None else c.outlier_values.shape[-1] for c in rows]),
                outlier_values=cat("outlier_values", 1),
                outlier_index=torch.cat([c.outlier_index[0].long().to(wide) for c in present], dim=1),
                outlier_bucket=torch.cat([buckets(c.outlier_index[0], c.shape[2], dim) for c in present], dim=1),
            )
        if ref.lowrank_a is not None:
            rank = max(c.lowrank_a.shape[-1] for c in present)
            pad = lambda t: torch.nn.functional.pad(t, (0, rank - t.shape[-1]))  # noqa: E731
            kwargs["lowrank_a"] = torch.cat([pad(c.lowrank_a[0]) for c in present], dim=1)
            empty = ref.lowrank_b.new_zeros(1, heads, dim, rank)
            kwargs["lowrank_b"] = torch.cat([empty if c is None else pad(c.lowrank_b) for c in rows])
            if ref.lowrank_a_scale is not None:
                for name in ("lowrank_a_scale", "lowrank_b_scale"):
                    empty = ref.lowrank_a_scale.new_zeros(1, heads, 1, rank)
                    kwargs[name] = torch.cat([empty if c is None else pad(getattr(c, name)) for c in rows])
        return cls(ref.dtype, dim, ref.bits, ref.per_channel, ref.group, lengths, group_sizes, **kwargs)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def tensors(self) -> list[torch.Tensor]:
        return _tensors(self)

    def bucket_counts(self) -> torch.Tensor:
        """(B,) bucket offsets each row keeps (an empty row keeps none)."""
        return torch.where(self.lengths > 0, -(-self.lengths // BUCKET) + 1, 0)

    def nbytes(self) -> dict[str, int]:
        return _stored_bytes(self)

    def dense(self, start: int, end: int) -> torch.Tensor:
        """(B, H, end - start, D) in the model dtype: row b's tokens at the last lengths[b]
        positions before `end`, zeros before them (left padding; tokens a window dropped)."""
        heads, tokens, dim = self.codes.shape[0], end - start, self.head_dim
        assert bool((self.lengths <= tokens).all()), "a row holds more tokens than the positions given"
        row = torch.repeat_interleave(torch.arange(self.batch), self.lengths)  # (N,) row of each token
        local = torch.arange(len(row)) - _offsets(self.lengths)[row]  # (N,) index within its row
        lead = tokens - self.lengths  # (B,) empty positions before each row's tokens
        slot = (row * tokens + lead[row] + local).to(self.codes.device)  # (N,) in (B, tokens)

        def padded(t: torch.Tensor) -> torch.Tensor:  # (H, N, ...) -> (B, H, tokens, ...), zeros elsewhere
            out = t.new_zeros(heads, self.batch * tokens, *t.shape[2:])
            out.index_copy_(1, slot, t)
            return out.reshape(heads, self.batch, tokens, *t.shape[2:]).transpose(0, 1)

        codes = unpack(padded(self.codes), self.bits, dim)  # (B, H, tokens, D)
        if self.per_channel:
            groups = _offsets(-(-self.lengths // self.group_sizes))  # (B,) first group of each row
            column = (groups[row] + local // self.group_sizes[row]).to(self.codes.device)  # (N,) group of each token
            scale = padded(self.scale.index_select(2, column).transpose(1, 2))  # (B, H, tokens, D)
            zero = padded(self.zero.index_select(2, column).transpose(1, 2))
        else:
            group = self.group
            scale = padded(self.scale).repeat_interleave(group, dim=-1)[..., :dim]
            zero = padded(self.zero).repeat_interleave(group, dim=-1)[..., :dim]
        out = dequantize_entries(codes, scale, zero)
        if self.lowrank_a is not None:
            out = out + lowrank_product(factor(padded(self.lowrank_a), self.lowrank_a_scale),
                                        factor(self.lowrank_b, self.lowrank_b_scale))
        out = _finish(out, self.dtype)
        if self.outlier_values is not None:
            owner = torch.repeat_interleave(torch.arange(self.batch), self.outlier_counts)  # (n_out,)
            base = ((owner * tokens + lead[owner]) * dim).to(self.codes.device)
            where = base + self.outlier_index.long()  # (H, n_out) flat in (B, tokens, D)
            flat = out.transpose(0, 1).reshape(heads, -1)  # (H, B * tokens * D), a copy
            flat.scatter_(1, where, self.outlier_values.to(self.dtype))
            out = flat.reshape(heads, self.batch, tokens, dim).transpose(0, 1)
        return out

    def select_rows(self, index: torch.Tensor) -> PromptPart:
        """The part of rows `index` (beam search reorders and repeats rows with it)."""
        index = index.cpu().long()
        dev = self.codes.device
        tok = _ranges(_offsets(self.lengths)[index], self.lengths[index]).to(dev)
        kwargs = dict(lengths=self.lengths[index], group_sizes=self.group_sizes[index],
                      codes=self.codes.index_select(1, tok))
        if self.per_channel:
            n_groups = -(-self.lengths // self.group_sizes)
            cols = _ranges(_offsets(n_groups)[index], n_groups[index]).to(dev)
            kwargs.update(scale=self.scale.index_select(2, cols), zero=self.zero.index_select(2, cols))
        else:
            kwargs.update(scale=self.scale.index_select(1, tok), zero=self.zero.index_select(1, tok))
        if self.outlier_values is not None:
            picks = _ranges(_offsets(self.outlier_counts)[index], self.outlier_counts[index]).to(dev)
            n_buckets = self.bucket_counts()
            bucket_picks = _ranges(_offsets(n_buckets)[index], n_buckets[index]).to(dev)
            kwargs.update(outlier_counts=self.outlier_counts[index], outlier_values=self.outlier_values.index_select(1, picks),
                          outlier_index=self.outlier_index.index_select(1, picks),
                          outlier_bucket=self.outlier_bucket.index_select(1, bucket_picks))
        if self.lowrank_a is not None:
            kwargs.update(lowrank_a=self.lowrank_a.index_select(1, tok))
            for name in ("lowrank_b", "lowrank_a_scale", "lowrank_b_scale"):
                if getattr(self, name) is not None:
                    kwargs[name] = getattr(self, name).index_select(0, index.to(dev))
        return replace(self, **kwargs)


@dataclass
class SinkPart:
    """Each row's first prompt tokens, kept exact (sink_tokens): K and V in the model dtype.

    counts (B,) on the CPU: row b keeps its first counts[b] held prompt tokens here (fewer than n
    when its prompt is shorter); they sit right before its compressed prompt tokens.
    keys, values (B, H, n, D), row b's tokens in its last counts[b] slots, zeros before (stored
    and counted: a uniform width lets attention read the sinks with the buffer).
    """

    counts: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_rows(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> SinkPart:
        """One (1, H, count, D) tensor of keys and of values per row (count 0 for a row without tokens)."""
        n = max(k.shape[2] for k in keys)
        right = lambda t: torch.nn.functional.pad(t, (0, 0, n - t.shape[2], 0))  # noqa: E731
        counts = torch.tensor([k.shape[2] for k in keys], dtype=torch.long)
        return cls(counts, torch.cat([right(k) for k in keys]), torch.cat([right(v) for v in values]))

    def slots(self, after: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, slot, position) of every kept token, in a region of `tokens` positions where row
        b holds after[b] (B,) compressed tokens behind its sinks, at the region's end."""
        n = self.keys.shape[2]
        slot = torch.arange(n)
        kept = slot[None, :] >= n - self.counts[:, None]  # (B, n)
        row, s = kept.nonzero(as_tuple=True)
        return row, s, tokens - after[row] - n + s

    def placed(self, keys: torch.Tensor, values: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (B, H, tokens, D) of the prompt region with the sinks written in (copies)."""
        row, s, pos = (t.to(keys.device) for t in self.slots(after, keys.shape[2]))
        keys, values = keys.clone(), values.clone()
        keys[row, :, pos] = self.keys[row, :, s]
        values[row, :, pos] = self.values[row, :, s]
        return keys, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def select_rows(self, index: torch.Tensor) -> SinkPart:
        dev = index.to(self.keys.device)
        return SinkPart(self.counts[index.cpu()], self.keys.index_select(0, dev), self.values.index_select(0, dev))


@dataclass
class StreamPart:
    """Streamed chunks of K (or V): n chunks of S tokens each, of all B rows, in order.

    codes (B, H, n * S, W) uint8.
    scale, zero fp16: (B, H, D, n * ng) when per_channel (ng groups of `group` tokens a chunk),
    else (B, H, n * S, ceil(D / group)).
    outlier_values (B, H, n, k) in the model dtype (or fp16) and outlier_index (B, H, n, k), flat indices
    t * D + d into each chunk's own (S, D), ascending; outlier_bucket (B, H, n, ceil(S / BUCKET)
    + 1) int32 (see buckets()); or None.
    lowrank_a (B, H, n * S, r) and lowrank_b (B, H, n, D, r) fp16 or int8, or None; int8 factors:
    lowrank_a_scale and lowrank_b_scale (B, H, n, 1, r) fp16, each chunk's column scales.
    """

    dtype: torch.dtype
    head_dim: int
    bits: int
    per_channel: bool
    group: int
    chunk_tokens: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    outlier_values: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    outlier_bucket: torch.Tensor | None = None
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None
    lowrank_a_scale: torch.Tensor | None = None
    lowrank_b_scale: torch.Tensor | None = None

    @classmethod
    def from_chunk(cls, chunk: CompressedChunk) -> StreamPart:
        assert chunk.exact is None, "the store holds compressed chunks only (method none keeps DynamicCache layers)"
        kwargs = dict(codes=chunk.codes, scale=chunk.scale, zero=chunk.zero)
        if chunk.outlier_values is not None:
            kwargs.update(outlier_values=chunk.outlier_values[:, :, None], outlier_index=chunk.outlier_index[:, :, None],
                          outlier_bucket=buckets(chunk.outlier_index, chunk.shape[2], chunk.shape[3])[:, :, None])
        if chunk.lowrank_a is not None:
            kwargs.update(lowrank_a=chunk.lowrank_a, lowrank_b=chunk.lowrank_b[:, :, None])
        if chunk.lowrank_a_scale is not None:
            kwargs.update(lowrank_a_scale=chunk.lowrank_a_scale[:, :, None], lowrank_b_scale=chunk.lowrank_b_scale[:, :, None])
        # contiguous, as the kernels read them (a QR factor comes column-major)
        kwargs = {name: t.contiguous() for name, t in kwargs.items()}
        return cls(chunk.dtype, chunk.shape[3], chunk.bits, chunk.per_channel, chunk.group, chunk.shape[2], **kwargs)

    @property
    def chunks(self) -> int:
        return self.codes.shape[2] // self.chunk_tokens

    def tensors(self) -> list[torch.Tensor]:
        return _tensors(self)

    def append(self, chunk: CompressedChunk) -> StreamPart:
        """This part with `chunk` (B, H, S, D) after its last chunk (copies: the part stays contiguous)."""
        new = StreamPart.from_chunk(chunk)
        assert (new.dtype, new.head_dim, new.bits, new.per_channel, new.group, new.chunk_tokens) == \
            (self.dtype, self.head_dim, self.bits, self.per_channel, self.group, self.chunk_tokens), \
            "streamed chunks must share layout, size and dtype"
        return self._joined(self, new)

    @staticmethod
    def _joined(a: StreamPart, b: StreamPart) -> StreamPart:
        groups = -1 if a.per_channel else 2
        kwargs = dict(codes=torch.cat([a.codes, b.codes], 2), scale=torch.cat([a.scale, b.scale], groups),
                      zero=torch.cat([a.zero, b.zero], groups))
        for name in ("outlier_values", "outlier_index", "outlier_bucket", "lowrank_a", "lowrank_b", "lowrank_a_scale",
                     "lowrank_b_scale"):
            if getattr(a, name) is not None:
                kwargs[name] = torch.cat([getattr(a, name), getattr(b, name)], 2)
        return replace(a, **kwargs)

    def drop_first(self, n: int) -> StreamPart | None:
        """This part without its first n chunks (copied, so that their memory is freed), or None."""
        if n >= self.chunks:
            return None
        s, ng = self.chunk_tokens, self.scale.shape[-1] // self.chunks if self.per_channel else 0
        keep = lambda t, axis, per: t.narrow(axis, n * per, t.shape[axis] - n * per).clone()  # noqa: E731
        kwargs = dict(codes=keep(self.codes, 2, s),
                      scale=keep(self.scale, 3, ng) if self.per_channel else keep(self.scale, 2, s),
                      zero=keep(self.zero, 3, ng) if self.per_channel else keep(self.zero, 2, s))
        if self.outlier_values is not None:
            kwargs.update(outlier_values=keep(self.outlier_values, 2, 1), outlier_index=keep(self.outlier_index, 2, 1),
                          outlier_bucket=keep(self.outlier_bucket, 2, 1))
        if self.lowrank_a is not None:
            kwargs.update(lowrank_a=keep(self.lowrank_a, 2, s), lowrank_b=keep(self.lowrank_b, 2, 1))
        if self.lowrank_a_scale is not None:
            kwargs.update(lowrank_a_scale=keep(self.lowrank_a_scale, 2, 1), lowrank_b_scale=keep(self.lowrank_b_scale, 2, 1))
        return replace(self, **kwargs)

    def nbytes(self) -> dict[str, int]:
        return _stored_bytes(self)

    def dense(self) -> torch.Tensor:
        """(B, H, n * S, D) in the model dtype."""
        batch, heads, tokens, _ = self.codes.shape
        n, s, dim = self.chunks, self.chunk_tokens, self.head_dim
        codes = unpack(self.codes, self.bits, dim)  # (B, H, n S, D)
        if self.per_channel:
            per_chunk = self.scale.shape[-1] // n
            t = torch.arange(tokens, device=self.codes.device)
            column = (t // s) * per_chunk + (t % s) // self.group  # (n S,) group of each token
            scale = self.scale.index_select(3, column).transpose(2, 3)
            zero = self.zero.index_select(3, column).transpose(2, 3)
        else:
            scale = self.scale.repeat_interleave(self.group, dim=-1)[..., :dim]
            zero = self.zero.repeat_interleave(self.group, dim=-1)[..., :dim]
        out = dequantize_entries(codes, scale, zero)
        if self.lowrank_a is not None:
            a = factor(self.lowrank_a.reshape(batch, heads, n, s, -1), self.lowrank_a_scale)
            b = factor(self.lowrank_b, self.lowrank_b_scale)
            out = out + lowrank_product(a, b).reshape(batch, heads, tokens, dim)
        out = _finish(out, self.dtype)
        if self.outlier_values is not None:
            offset = torch.arange(n, device=self.codes.device)[:, None] * (s * dim)  # (n, 1)
            where = (self.outlier_index.long() + offset).reshape(batch, heads, -1)
            values = self.outlier_values.reshape(batch, heads, -1).to(self.dtype)
            out = out.reshape(batch, heads, -1).scatter(-1, where, values)
            out = out.reshape(batch, heads, tokens, dim)
        return out

    def select_rows(self, index: torch.Tensor) -> StreamPart:
        index = index.to(self.codes.device)
        return replace(self, **{f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass(frozen=True)
class KVStore:
    """One layer's compressed keys and values, with the positions they sit at.

    The prompt covers positions [prompt_start, prompt_end), each row its last tokens in there:
    its sinks (kept exact, sink_tokens) then its compressed tokens; the stream part [prompt_end
    + dropped * S, ...), S = its chunk_tokens; the cache's exact buffer follows. A
    sliding-window layer drops the prompt, then whole chunks, as they leave the window.
    Immutable, like its parts: appending or dropping makes a new store, so one handed to
    attention is not changed under it by the flush that follows.
    """

    batch: int
    prompt_start: int = 0
    prompt_end: int = 0
    prompt_keys: PromptPart | None = None
    prompt_values: PromptPart | None = None
    stream_keys: StreamPart | None = None
    stream_values: StreamPart | None = None
    dropped: int = 0  # streamed chunks dropped from the front
    sinks: SinkPart | None = None

    @property
    def chunks(self) -> int:
        return 0 if self.stream_keys is None else self.stream_keys.chunks

    @property
    def has_prompt(self) -> bool:
        return self.prompt_keys is not None or self.sinks is not None

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) prompt tokens each row holds (sinks and compressed), on the CPU."""
        held = torch.zeros(self.batch, dtype=torch.long)
        if self.prompt_keys is not None:
            held = held + self.prompt_keys.lengths
        if self.sinks is not None:
            held = held + self.sinks.counts
        return held

    def offset(self, chunk_tokens: int) -> int:
        """The first position held (0 unless a sliding window dropped older tokens)."""
        if self.has_prompt:
            return self.prompt_start
        return self.prompt_end + self.dropped * chunk_tokens

    def with_prompt(self, keys: list[CompressedChunk | None], values: list[CompressedChunk | None],
                    sinks: SinkPart | None = None) -> KVStore:
        """This store with the prompt rows' chunks (batch-1, None for a row without tokens) and,
        kept exact before them, their sinks."""
        if all(k is None for k in keys):
            return self.without_prompt() if sinks is None else replace(self, sinks=sinks)
        return replace(self, prompt_keys=PromptPart.from_rows(keys), prompt_values=PromptPart.from_rows(values),
                       sinks=sinks)

    def appended(self, keys: CompressedChunk, values: CompressedChunk) -> KVStore:
        """This store with one more streamed chunk (batch, H, S, D) of keys and of values."""
        if self.stream_keys is None:
            return replace(self, stream_keys=StreamPart.from_chunk(keys), stream_values=StreamPart.from_chunk(values))
        return replace(self, stream_keys=self.stream_keys.append(keys), stream_values=self.stream_values.append(values))

    def without_prompt(self) -> KVStore:
        return replace(self, prompt_keys=None, prompt_values=None, sinks=None, prompt_start=self.prompt_end)

    def without_chunks(self, n: int) -> KVStore:
        """This store without its first n streamed chunks."""
        if not n:
            return self
        return replace(self, stream_keys=self.stream_keys.drop_first(n), stream_values=self.stream_values.drop_first(n),
                       dropped=self.dropped + n)

    def with_dropped(self, n: int) -> KVStore:
        """This store with n more chunks counted as dropped without ever being stored."""
        return replace(self, dropped=self.dropped + n)

    def dense(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values (B, H, held, D) from offset() to the buffer, or None when nothing is held."""
        keys, values = [], []
        if self.has_prompt:
            keys_p, values_p = self._prompt_dense()
            keys.append(keys_p)
            values.append(values_p)
        if self.stream_keys is not None:
            keys.append(self.stream_keys.dense())
            values.append(self.stream_values.dense())
        if not keys:
            return None, None
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def _prompt_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, prompt_end - prompt_start, D) of the prompt, sinks in place."""
        if self.prompt_keys is not None:
            keys = self.prompt_keys.dense(self.prompt_start, self.prompt_end)
            values = self.prompt_values.dense(self.prompt_start, self.prompt_end)
        if self.sinks is None:
            return keys, values
        if self.prompt_keys is None:  # every row's prompt is all sinks
            batch, heads, _, dim = self.sinks.keys.shape
            keys = values = self.sinks.keys.new_zeros(batch, heads, self.prompt_end - self.prompt_start, dim)
            after = torch.zeros(batch, dtype=torch.long)
        else:
            after = self.prompt_keys.lengths
        return self.sinks.placed(keys, values, after)

    def parts(self) -> list:
        return [p for p in (self.prompt_keys, self.prompt_values, self.stream_keys, self.stream_values) if p is not None]

    def nbytes(self) -> dict[str, int]:
        """Bytes stored by component: COMPONENTS', then the sinks'."""
        total = dict.fromkeys(STORED, 0)
        for part in self.parts():
            for name, size in part.nbytes().items():
                total[name] += size
        total["sinks"] = 0 if self.sinks is None else self.sinks.nbytes()
        return total

    def elements(self) -> int:
        """K and V scalars the store holds (sinks included)."""
        prompt = int(self.prompt_lengths().sum())
        stream = 0 if self.stream_keys is None else self.stream_keys.codes.shape[0] * self.stream_keys.codes.shape[2]
        heads_dim = next((p.codes.shape[-3] * p.head_dim for p in self.parts()), 0)
        if self.sinks is not None:
            heads_dim = self.sinks.keys.shape[1] * self.sinks.keys.shape[3]
        return 2 * (prompt + stream) * heads_dim

    def select_rows(self, index: torch.Tensor) -> KVStore:
        """The store whose row i is this one's row index[i] (beam search)."""
        kwargs = {}
        if self.prompt_keys is not None:
            kwargs.update(prompt_keys=self.prompt_keys.select_rows(index), prompt_values=self.prompt_values.select_rows(index))
        if self.stream_keys is not None:
            kwargs.update(stream_keys=self.stream_keys.select_rows(index), stream_values=self.stream_values.select_rows(index))
        if self.sinks is not None:
            kwargs.update(sinks=self.sinks.select_rows(index))
        return replace(self, batch=len(index), **kwargs)
