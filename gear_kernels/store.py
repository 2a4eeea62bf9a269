"""One layer's compressed K and V, as a cache holds them and attention reads them.

Everything compressed is a segment: a prompt row (compressed once after prefill, row by row,
without its left padding) or one row of a streamed chunk (every `buffer_size` generated tokens
of all rows compressed together). A segment is a slice of tokens of one batch row, at known
positions; all of a layer's segments lie back to back, varlen (flash-attn's cu_seqlens):
each stored field (quantizers/base.py: the quantizer's codes and scales, the corrections'
outliers and low-rank factors) is one (H, entries) tensor, segment s's entries at
[offsets[f][s], offsets[f][s] + counts[f][s]). Appending, row selection, dropping, byte counts
and the rebuild read the fields tables and never name a tensor. Keys and values are packed
separately (each with its own quantizer: key_bits, value_bits, layouts).

Two stages compose with any quantizer here, each in one place: before its compressed tokens a
row may keep its first prompt tokens exact (a SinkPart: attention sinks, sink_tokens), and a
store may hold everything rotated (its `rotation`, rotation.py): a writer puts what it stores in
the store's basis (to_basis), and what the store rebuilds (dense) and attention over it
(attention_reference, triton_attention) return is in the model's basis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from .chunk import CompressedChunk, rebuild
from .corrections import lowrank, outliers
from .quantizers import COMPONENTS, Field, Quantizer
from .rotation import rotate, unrotate

STORED = (*(c for c in COMPONENTS if c != "exact"), "sinks")  # what a KVStore's nbytes() reports


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [starts[i], starts[i] + counts[i]) (1-d CPU tensors), without a loop."""
    total = int(counts.sum())
    begins = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - begins, counts) + torch.arange(total)


def _exclusive(counts: torch.Tensor) -> torch.Tensor:
    """(S,) counts -> (S,) where each one's entries begin."""
    return torch.cumsum(counts, 0) - counts


def _gathered(index: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """index.gather(1, taken) for outlier indices of any stored width, as long (torch's CPU gather
    has no uint16: its bits are gathered as int16)."""
    if index.dtype == torch.uint16:
        return index.view(torch.int16).gather(1, taken).long() & 0xFFFF
    return index.gather(1, taken).long()


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(H, entries) tensors joined on the entries; outlier indices of segments of different sizes
    (uint8, uint16, int32) in the widest type among them (torch promotes no uint16)."""
    widest = max((t.dtype for t in tensors), key=lambda dtype: torch.empty(0, dtype=dtype).element_size())
    return torch.cat([t.to(widest) for t in tensors], 1)


@dataclass(frozen=True)
class Packed:
    """One side (keys or values) of a layer's segments.

    rows, starts, tokens (S,) long on the CPU: each segment's batch row, first position, length.
    groups (S,): tokens an item of a 'group' field covers, in each segment (0: none).
    fields: the table of what is stored; data[name] (H, entries) on the device; offsets[name],
    counts[name] (S,) on the CPU.
    """

    dtype: torch.dtype
    head_dim: int
    quantizer: Quantizer
    fields: tuple[Field, ...]
    rows: torch.Tensor
    starts: torch.Tensor
    tokens: torch.Tensor
    groups: torch.Tensor
    data: dict[str, torch.Tensor]
    offsets: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]

    @classmethod
    def from_chunk(cls, chunk: CompressedChunk, rows: torch.Tensor, starts: torch.Tensor) -> Packed:
        """A chunk (B, H, T, D) as B segments: row i of the chunk is batch row rows[i], from starts[i]."""
        assert chunk.quantizer is not None, "the store holds compressed chunks only (method none keeps DynamicCache layers)"
        batch, heads, tokens, head_dim = chunk.shape
        data, offsets, counts = {}, {}, {}
        for f in chunk.fields():
            t = chunk.parts[f.name]  # (B, H, items, *inner)
            n = t[0, 0].numel()
            data[f.name] = t.reshape(batch, heads, n).transpose(0, 1).reshape(heads, batch * n).contiguous()
            counts[f.name] = torch.full((batch,), n, dtype=torch.long)
            offsets[f.name] = torch.arange(batch) * n
        full = lambda value: torch.full((batch,), value, dtype=torch.long)  # noqa: E731
        return cls(chunk.dtype, head_dim, chunk.quantizer, chunk.fields(), rows.cpu().long(), starts.cpu().long(),
                   full(tokens), full(chunk.token_group), data, offsets, counts)

    @property
    def segments(self) -> int:
        return len(self.rows)

    @staticmethod
    def concat(sides: list[Packed]) -> Packed:
        """The segments of every side in `sides`, in order."""
        head = sides[0]
        for other in sides[1:]:
            assert (other.dtype, other.head_dim, other.quantizer, other.fields) == \
                (head.dtype, head.head_dim, head.quantizer, head.fields), "segments must share dtype, quantizer and fields"
        cat = lambda name: torch.cat([getattr(p, name) for p in sides])  # noqa: E731
        offsets = {}
        for n in head.data:
            shift = _exclusive(torch.tensor([p.data[n].shape[1] for p in sides]))
            offsets[n] = torch.cat([p.offsets[n] + int(k) for p, k in zip(sides, shift)])
        return replace(head, rows=cat("rows"), starts=cat("starts"), tokens=cat("tokens"), groups=cat("groups"),
                       data={n: _cat([p.data[n] for p in sides]) for n in head.data}, offsets=offsets,
                       counts={n: torch.cat([p.counts[n] for p in sides]) for n in head.data})

    def take(self, segments: torch.Tensor) -> Packed:
        """The segments `segments` (CPU long), in that order, their entries copied back to back."""
        data, offsets, counts = {}, {}, {}
        for name, t in self.data.items():
            n = self.counts[name][segments]
            data[name] = t.index_select(1, _ranges(self.offsets[name][segments], n).to(t.device))
            offsets[name], counts[name] = _exclusive(n), n
        return replace(self, rows=self.rows[segments], starts=self.starts[segments], tokens=self.tokens[segments],
                       groups=self.groups[segments], data=data, offsets=offsets, counts=counts)

    def select_rows(self, index: torch.Tensor) -> Packed:
        """Row i is this side's row index[i] (beam search reorders and repeats rows with it)."""
        new_row, segment = (self.rows[None, :] == index.cpu().long()[:, None]).nonzero(as_tuple=True)
        return replace(self.take(segment), rows=new_row)

    def nbytes(self) -> dict[str, int]:
        out = dict.fromkeys(STORED, 0)
        for f in self.fields:
            t = self.data[f.name]
            out[f.component] += t.numel() * t.element_size()
        return out

    @cached_property
    def _tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        segment = torch.repeat_interleave(torch.arange(self.segments), self.tokens)
        return segment, torch.arange(len(segment)) - _exclusive(self.tokens)[segment]

    def token_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) segment of every stored token, and its index within the segment, in packed order
        (derived once a side: decode attention asks at every step)."""
        return self._tokens

    def _token_aligned(self, name: str, axis: str, segment: torch.Tensor, local: torch.Tensor, every: bool
                       ) -> torch.Tensor:
        """A field of the quantizer (H, entries) -> one item for each token of (segment, local)
        (n,), (H, n, inner); every: they are all the stored tokens, in packed order."""
        t = self.data[name]
        group = self.groups.clamp(min=1)
        per_segment = {"token": self.tokens, "group": -(-self.tokens // group), "segment": torch.ones_like(self.tokens)}
        item = {"token": local, "group": local // group[segment], "segment": torch.zeros_like(local)}
        inner = int((self.counts[name] // per_segment[axis]).max())  # the quantizer's: the same in every segment
        items = t.reshape(t.shape[0], -1, inner)  # every segment's offset is a whole number of items
        if axis == "token" and every:  # segments lie back to back in token order: a view, no gather
            return items
        return items[:, (self.offsets[name][segment] // inner + item[axis]).to(t.device)]  # an item a token

    def _factors(self, segment: torch.Tensor, local: torch.Tensor, tokens: torch.Tensor | None) -> tuple:
        """Low-rank A (H, n, r) of the tokens (packed indices; None: all) and B (H, S, D, r) fp32,
        a segment's columns beyond its own rank 0."""
        rank = self.counts["lowrank_a"] // self.tokens  # (S,)
        r, dev = int(rank.max()), self.data["lowrank_a"].device
        if int(rank.min()) == r:  # one rank throughout: views, no gather
            view = lambda name, *lead: self.data[name].reshape(self.data[name].shape[0], *lead, r)  # noqa: E731
            a, b = view("lowrank_a", -1), view("lowrank_b", self.segments, self.head_dim)
            a = a if tokens is None else a[:, tokens.to(dev)]
            if "lowrank_a_scale" in self.data:
                a_scale = view("lowrank_a_scale", self.segments)[:, segment.to(dev)]
                b_scale = view("lowrank_b_scale", self.segments, 1)
                return lowrank.factor(a, a_scale), lowrank.factor(b, b_scale), segment.to(dev)
            return a.float(), b.float(), segment.to(dev)
        col = torch.arange(r)

        def gathered(name: str, first: torch.Tensor, width: torch.Tensor, lead: tuple) -> torch.Tensor:
            valid = col < width[:, None]  # (n, r)
            where = (first[:, None] + col).where(valid, 0).to(dev)
            t = self.data[name][:, where] * valid.to(dev)  # zeros beyond each rank
            return t.reshape(t.shape[0], *lead, r)

        n_tok = len(segment)
        a = gathered("lowrank_a", self.offsets["lowrank_a"][segment] + local * rank[segment], rank[segment], (n_tok,))
        d = torch.arange(self.head_dim)
        b_first = (self.offsets["lowrank_b"][:, None] + d * rank[:, None]).reshape(-1)  # (S * D,)
        b = gathered("lowrank_b", b_first, rank.repeat_interleave(self.head_dim), (self.segments, self.head_dim))
        if "lowrank_a_scale" in self.data:
            a_scale = gathered("lowrank_a_scale", self.offsets["lowrank_a_scale"][segment], rank[segment], (n_tok,))
            b_scale = gathered("lowrank_b_scale", self.offsets["lowrank_b_scale"], rank, (self.segments, 1))
            return lowrank.factor(a, a_scale), lowrank.factor(b, b_scale), segment.to(dev)
        return a.float(), b.float(), segment.to(dev)

    def rebuilt(self, tokens: torch.Tensor | None = None, outlier_entries: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tokens `tokens` ((n,) packed indices, CPU long; None: every one, in packed
        order), (H, n, D) in the model dtype (chunk.rebuild, and the outliers written over it:
        bitwise what decompress gives for each chunk). outlier_entries: those of outlier_groups()
        that hold every outlier of `tokens` (else every outlier is looked at)."""
        segment, local = self.token_map()
        if tokens is not None:
            segment, local = segment[tokens], local[tokens]
        axes = {f.name: f.axis for f in self.fields}
        every = tokens is None
        aligned = {f.name: self._token_aligned(f.name, f.axis, segment, local, every) for f in self.quantizer.fields}
        factors = self._factors(segment, local, tokens) if "lowrank_a" in axes else None
        out = rebuild(self.quantizer, aligned, factors, self.head_dim, self.dtype)
        if "outlier_values" in axes:
            out = self._with_outliers(out, tokens, outlier_entries)
        return out

    @cached_property
    def _outlier_first_token(self) -> torch.Tensor:
        """(n,) the packed index of the first token of each outlier's segment, on the device
        (derived once a side: the packed torch path asks at every block of every step)."""
        owner = torch.repeat_interleave(torch.arange(self.segments), self.counts["outlier_index"])
        return _exclusive(self.tokens)[owner].to(self.data["outlier_index"].device)

    def _with_outliers(self, out: torch.Tensor, tokens: torch.Tensor | None, entries: torch.Tensor | None
                       ) -> torch.Tensor:
        """out (H, n, D) of the tokens `tokens` (None: all) with their outliers written over it;
        entries (H, m): the outliers to look at (-1: none), else all of them."""
        heads, n_tok, dim = out.shape
        first_token = self._outlier_first_token  # (n,)
        index = self.data["outlier_index"]  # (H, n) flat t * D + d in its segment
        values = self.data["outlier_values"]  # (H, n)
        if tokens is None:
            where = first_token * dim + index.long()  # flat in (N, D)
            return outliers.apply(out.reshape(heads, -1), values, where).reshape(out.shape)
        stored = int(self.tokens.sum())
        if entries is not None:  # only these outliers are read: the step's cost is the block's
            taken = entries.long().clamp(min=0)
            first_token, index, values = first_token[taken], _gathered(index, taken), values.gather(1, taken)
        index = index.long()
        token = first_token + index // dim  # each outlier's packed token
        if entries is not None:
            token = token.where(entries >= 0, stored)  # a pad: no token
        # each token's row in out; the outliers of tokens not asked for go to a spare row, dropped
        row = torch.full((stored + 1,), n_tok, dtype=torch.long)
        row[tokens] = torch.arange(n_tok)
        where = row.to(out.device)[token] * dim + index % dim
        spare = torch.cat([out, out.new_zeros(heads, 1, dim)], 1).reshape(heads, -1)
        return outliers.apply(spare, values, where).reshape(heads, n_tok + 1, dim)[:, :n_tok]

    def outlier_groups(self, group: torch.Tensor, groups: int) -> list[torch.Tensor]:
        """Given each stored token's group (N,) in packed order, each group's outliers: for group
        i, (H, m_i) int32 indices into the outlier fields (m_i: the most of any head; -1 pads),
        so that rebuilding a group's tokens looks at its own outliers, not at all of them."""
        index = self.data["outlier_index"]
        token = self._outlier_first_token + index.long() // self.head_dim  # (H, n)
        owner = group.to(index.device)[token]  # (H, n) each outlier's group
        order = torch.sort(owner, dim=1, stable=True).indices  # (H, n) by group
        counts = torch.zeros(index.shape[0], groups, dtype=torch.long, device=index.device)
        counts.scatter_add_(1, owner, torch.ones_like(owner))
        begins = torch.cumsum(counts, 1) - counts  # (H, groups)
        out = []
        for i in range(groups):
            slot = torch.arange(int(counts[:, i].max()), device=index.device)
            valid = slot[None, :] < counts[:, i : i + 1]
            taken = order.gather(1, (begins[:, i : i + 1] + slot).where(valid, 0))
            out.append(taken.where(valid, -1).int())
        return out

    def dense(self, batch: int, first: int, last: int) -> torch.Tensor:
        """(batch, H, last - first, D): each stored token at its row and position, zeros elsewhere."""
        out = self.rebuilt()  # (H, N, D)
        heads, _, dim = out.shape
        segment, local = self.token_map()
        slot = self.rows[segment] * (last - first) + self.starts[segment] + local - first
        placed = out.new_zeros(heads, batch * (last - first), dim)
        placed.index_copy_(1, slot.to(out.device), out)
        return placed.reshape(heads, batch, last - first, dim).transpose(0, 1)


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

    def placed(self, keys: torch.Tensor, values: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (B, H, L, D) with each row's sinks written right before position ends[b] (copies)."""
        n = self.keys.shape[2]
        slot = torch.arange(n)
        row, s = (slot[None, :] >= n - self.counts[:, None]).nonzero(as_tuple=True)
        pos = (ends[row] - n + s).to(keys.device)
        row, s = row.to(keys.device), s.to(keys.device)
        keys, values = keys.clone(), values.clone()
        keys[row, :, pos] = self.keys[row, :, s]
        values[row, :, pos] = self.values[row, :, s]
        return keys, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def select_rows(self, index: torch.Tensor) -> SinkPart:
        dev = index.to(self.keys.device)
        return SinkPart(self.counts[index.cpu()], self.keys.index_select(0, dev), self.values.index_select(0, dev))


@dataclass(frozen=True)
class KVStore:
    """One layer's compressed keys and values, with the positions they sit at.

    The prompt covers positions [prompt_start, prompt_end), each row its last tokens in there:
    its sinks (kept exact, sink_tokens) then its compressed tokens; streamed chunks follow from
    prompt_end + dropped * S (S = buffer_size); the cache's exact buffer follows. A
    sliding-window layer drops the prompt, then whole chunks, as they leave the window.
    Immutable: appending or dropping makes a new store, so one handed to attention is not
    changed under it by the flush that follows.
    """

    batch: int
    prompt_start: int = 0
    prompt_end: int = 0
    keys: Packed | None = None
    values: Packed | None = None
    chunks: int = 0  # streamed chunks held
    dropped: int = 0  # streamed chunks dropped from the front
    sinks: SinkPart | None = None
    # (head_dim,) signs: K and V (sinks too) are held rotated (rotation.py); what the store
    # rebuilds, and what attention over it returns, is in the model's basis
    rotation: torch.Tensor | None = None
    # what a reader derives from this store once (triton_attention: its launch tables); replace()
    # makes a store with an empty one
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _remembered(self, name: str, compute):
        """compute(), once a store (attention asks for the same facts at every decode step)."""
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]

    def _prompt_tokens(self) -> torch.Tensor:
        """(B,) compressed prompt tokens each row holds (not to be changed in place)."""
        def count() -> torch.Tensor:
            held = torch.zeros(self.batch, dtype=torch.long)
            if self.keys is not None:
                prompt = self.keys.starts < self.prompt_end
                held.index_add_(0, self.keys.rows[prompt], self.keys.tokens[prompt])
            return held
        return self._remembered("prompt_tokens", count)

    @property
    def has_prompt(self) -> bool:
        return self.sinks is not None or self._remembered("has_prompt", lambda: bool(self._prompt_tokens().any()))

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) prompt tokens each row holds (sinks and compressed), on the CPU."""
        held = self._prompt_tokens()
        return held if self.sinks is None else held + self.sinks.counts

    def offset(self, chunk_tokens: int) -> int:
        """The first position held (0 unless a sliding window dropped older tokens)."""
        if self.has_prompt:
            return self.prompt_start
        return self.prompt_end + self.dropped * chunk_tokens

    def _with(self, keys: list[Packed], values: list[Packed], **changes) -> KVStore:
        """This store with the segments of keys and values after its own."""
        held_k, held_v = ([] if self.keys is None else [self.keys]), ([] if self.values is None else [self.values])
        return replace(self, keys=Packed.concat(held_k + keys), values=Packed.concat(held_v + values), **changes)

    def with_prompt(self, keys: list[CompressedChunk | None], values: list[CompressedChunk | None],
                    sinks: SinkPart | None = None) -> KVStore:
        """This store (holding nothing yet) with the prompt rows' chunks (batch-1, None for a row
        without tokens) and, kept exact before them, their sinks."""
        assert self.keys is None, "the prompt comes first"
        present = [b for b, k in enumerate(keys) if k is not None]
        if not present:
            return self.without_prompt() if sinks is None else replace(self, sinks=sinks)
        side = lambda chunks: [Packed.from_chunk(chunks[b], torch.tensor([b]),  # noqa: E731
                                                 torch.tensor([self.prompt_end - chunks[b].shape[2]])) for b in present]
        return self._with(side(keys), side(values), sinks=sinks)

    def appended(self, keys: CompressedChunk, values: CompressedChunk) -> KVStore:
        """This store with one more streamed chunk (batch, H, S, D) of keys and of values."""
        held = self.chunk_tokens()
        if held and keys.shape[2] != held:
            raise ValueError(f"a streamed chunk of {keys.shape[2]} tokens after chunks of {held}: every chunk of a "
                             "layer holds buffer_size tokens")
        start = torch.full((self.batch,), self.prompt_end + (self.dropped + self.chunks) * keys.shape[2])
        rows = torch.arange(self.batch)
        return self._with([Packed.from_chunk(keys, rows, start)], [Packed.from_chunk(values, rows, start)],
                          chunks=self.chunks + 1)

    def _keep(self, keep: torch.Tensor, **changes) -> KVStore:
        if bool(keep.all()):
            return replace(self, **changes)
        if not bool(keep.any()):
            return replace(self, keys=None, values=None, **changes)
        segments = keep.nonzero().flatten()
        return replace(self, keys=self.keys.take(segments), values=self.values.take(segments), **changes)

    def without_prompt(self) -> KVStore:
        changes = dict(sinks=None, prompt_start=self.prompt_end)
        if self.keys is None:
            return replace(self, **changes)
        return self._keep(self.keys.starts >= self.prompt_end, **changes)

    def without_chunks(self, n: int) -> KVStore:
        """This store without its first n streamed chunks."""
        if not n:
            return self
        streamed = self.keys.starts >= self.prompt_end
        first = torch.unique(self.keys.starts[streamed])  # each chunk's start, ascending
        cut = int(first[n]) if n < len(first) else None
        keep = ~streamed if cut is None else (~streamed | (self.keys.starts >= cut))
        return self._keep(keep, chunks=self.chunks - n, dropped=self.dropped + n)

    def with_dropped(self, n: int) -> KVStore:
        """This store with n more chunks counted as dropped without ever being stored (itself
        when n is 0: what it has derived stays valid)."""
        return replace(self, dropped=self.dropped + n) if n else self

    def chunk_tokens(self) -> int:
        """Tokens a streamed chunk holds (0 when none is held)."""
        if not self.chunks:
            return 0
        return self._remembered("chunk_tokens", lambda: int(self.keys.tokens[self.keys.starts >= self.prompt_end][0]))

    def to_basis(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) in the basis the store holds (rotated by its rotation, if any)."""
        return x if self.rotation is None else rotate(x, self.rotation)

    def from_basis(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """x (..., D) of the store's basis in the model's (None stays None)."""
        return x if x is None or self.rotation is None else unrotate(x, self.rotation)

    def dense(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys and values (B, H, held, D) from offset() to the buffer, in the model's basis, or
        None when nothing is held."""
        chunk_tokens = self.chunk_tokens()
        first = self.offset(chunk_tokens)
        last = self.prompt_end + (self.dropped + self.chunks) * chunk_tokens
        if last == first:
            return None, None
        if self.keys is not None:
            keys = self.keys.dense(self.batch, first, last)
            values = self.values.dense(self.batch, first, last)
        else:
            batch, heads, _, dim = self.sinks.keys.shape
            keys = values = self.sinks.keys.new_zeros(batch, heads, last - first, dim)
        if self.sinks is not None:
            keys, values = self.sinks.placed(keys, values, self.prompt_end - first - self._prompt_tokens())
        return self.from_basis(keys), self.from_basis(values)

    def parts(self) -> list[Packed]:
        return [p for p in (self.keys, self.values) if p is not None]

    def nbytes(self) -> dict[str, int]:
        """Bytes stored by component (quantizers.COMPONENTS), then the sinks'."""
        total = dict.fromkeys(STORED, 0)
        for part in self.parts():
            for name, size in part.nbytes().items():
                total[name] += size
        total["sinks"] = 0 if self.sinks is None else self.sinks.nbytes()
        return total

    def elements(self) -> int:
        """K and V scalars the store holds (sinks included)."""
        held = 0 if self.keys is None else int(self.keys.tokens.sum())
        if self.sinks is not None:
            held += int(self.sinks.counts.sum())
            heads_dim = self.sinks.keys.shape[1] * self.sinks.keys.shape[3]
        elif self.keys is not None:
            heads_dim = next(iter(self.keys.data.values())).shape[0] * self.keys.head_dim
        else:
            return 0
        return 2 * held * heads_dim

    def select_rows(self, index: torch.Tensor) -> KVStore:
        """The store whose row i is this one's row index[i] (beam search)."""
        kwargs = {}
        if self.keys is not None:
            kwargs.update(keys=self.keys.select_rows(index), values=self.values.select_rows(index))
        if self.sinks is not None:
            kwargs.update(sinks=self.sinks.select_rows(index))
        return replace(self, batch=len(index), **kwargs)
