"""Decode attention over one layer's compressed cache: input checks and the torch reference.

A layer's cache is its KVStore (store.py: prompt rows and streamed chunks as varlen segments),
then the exact buffer k_buf / v_buf (batch, kv_heads, n_buf, head_dim) of the latest tokens.
Row b attends to its own stored prompt tokens (its left padding was never stored; its sinks,
kept exact, first), every streamed chunk, then the buffer; the store must hold everything from
position 0 (a layer whose sliding window dropped tokens attends through the model's own mask
instead).

Attention for query heads q (batch, q_heads, q_len, head_dim), q_heads = kv_heads * ratio
(query head j reads kv head j // ratio, as transformers' repeat_kv):

    out = softmax(q K^T * scale + mask) V,   K, V = the row's stored tokens ++ buffer

computed in fp32 and returned in q's dtype. For q_len > 1 the queries are the last q_len
tokens of the buffer, causally masked among themselves. The packed Triton path
(triton_attention.py) computes the same without rebuilding K and V.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .store import KVStore, SinkPart

# tokens of each row that the packed torch path rebuilds at once: what it holds beside the store
BLOCK_TOKENS = 2048

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeProblem:
    """Shapes of a checked decode-attention call."""

    batch: int
    kv_heads: int
    q_heads: int
    q_len: int
    head_dim: int
    n_buf: int

    @property
    def ratio(self) -> int:
        return self.q_heads // self.kv_heads


def check_decode_inputs(q: torch.Tensor, store: KVStore | None, k_buf: torch.Tensor | None,
                        v_buf: torch.Tensor | None, scale: float) -> DecodeProblem:
    """Validate a decode-attention call (both paths); raise ValueError/TypeError naming the problem."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be (batch, q_heads, q_len, head_dim), got {getattr(q, 'shape', q)}")
    if q.dtype not in MODEL_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported: use float16, bfloat16 or float32")
    batch, q_heads, q_len, head_dim = q.shape
    if batch < 1 or q_len < 1 or head_dim < 1:
        raise ValueError(f"q has an empty dimension: {tuple(q.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if (k_buf is None) != (v_buf is None):
        raise ValueError("give both k_buf and v_buf, or neither")
    if store is not None and not isinstance(store, KVStore):
        raise TypeError(f"store: expected a gear_kernels.store.KVStore, got {type(store).__name__}")
    kv_heads = None
    n_buf = 0
    if k_buf is not None:
        if k_buf.dim() != 4 or k_buf.shape != v_buf.shape:
            raise ValueError(f"k_buf {tuple(k_buf.shape)} and v_buf {tuple(v_buf.shape)} must be equal 4-d shapes")
        if k_buf.shape[0] != batch or k_buf.shape[-1] != head_dim:
            raise ValueError(f"buffer shape {tuple(k_buf.shape)} does not fit q {tuple(q.shape)}")
        if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype:
            raise ValueError(f"buffer dtype {k_buf.dtype}/{v_buf.dtype} differs from the query dtype {q.dtype}")
        if k_buf.device != q.device or v_buf.device != q.device:
            raise ValueError("the buffer and q must be on the same device")
        kv_heads, n_buf = k_buf.shape[1], k_buf.shape[2]
    if store is not None:
        if store.offset(1) != 0 or store.dropped:
            raise ValueError("the store has dropped tokens (a sliding window): attend through the model's mask instead")
        if store.batch != batch:
            raise ValueError(f"the store holds a batch of {store.batch}, q has {batch}")
        for part in store.parts():
            heads = next(iter(part.data.values())).shape[0]
            device = next(iter(part.data.values())).device
            if (part.head_dim, part.dtype, device) != (head_dim, q.dtype, q.device):
                raise ValueError(
                    f"a store part (head_dim {part.head_dim}, {part.dtype} on {device}) does not fit "
                    f"q (head_dim {head_dim}, {q.dtype} on {q.device})"
                )
            if kv_heads is not None and heads != kv_heads:
                raise ValueError(f"the store has {heads} kv heads, the buffer {kv_heads}")
            kv_heads = heads
        if (store.keys is None) != (store.values is None) or (store.keys is not None and not (
                torch.equal(store.keys.rows, store.values.rows) and torch.equal(store.keys.starts, store.values.starts)
                and torch.equal(store.keys.tokens, store.values.tokens))):
            raise ValueError("the store must hold keys and values alike")
        if store.sinks is not None:
            sinks = store.sinks.keys
            if (sinks.shape[-1], sinks.dtype, sinks.device) != (head_dim, q.dtype, q.device) or \
                    store.sinks.values.shape != sinks.shape:
                raise ValueError(f"the store's sinks {tuple(sinks.shape)} ({sinks.dtype} on {sinks.device}) do not fit "
                                 f"q {tuple(q.shape)} ({q.dtype} on {q.device})")
            if kv_heads is not None and sinks.shape[1] != kv_heads:
                raise ValueError(f"the store's sinks have {sinks.shape[1]} kv heads, the rest {kv_heads}")
            kv_heads = sinks.shape[1]
        if store.rotation is not None and tuple(store.rotation.shape) != (head_dim,):
            raise ValueError(f"the store's rotation has {tuple(store.rotation.shape)} signs, q's head_dim is {head_dim}")
    if kv_heads is None:
        raise ValueError("nothing to attend to: no store and no buffer")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    if q_len > n_buf and q_len > 1:
        raise ValueError(f"{q_len} queries need their own tokens in the buffer, which holds {n_buf}")
    return DecodeProblem(batch, kv_heads, q_heads, q_len, head_dim, n_buf)


def sinks_before_buffer(store: KVStore, k_buf: torch.Tensor | None, v_buf: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The store's sinks (B, H, n, D) ahead of the exact buffer: K and V (B, H, n + n_buf, D) and
    (B,) slots to skip at each row's front (a row with fewer sinks has empty slots there).

    Attention is the same over keys in any order, and every sink precedes every query, so the
    packed Triton path reads the sinks as the buffer's first tokens.
    """
    sinks = store.sinks
    lead = sinks.keys.shape[2] - sinks.counts
    if k_buf is None:
        return sinks.keys, sinks.values, lead
    return torch.cat([sinks.keys, k_buf], dim=-2), torch.cat([sinks.values, v_buf], dim=-2), lead


@dataclass(frozen=True)
class BlockPlan:
    """How the packed torch path walks a store: block i holds each row's stored tokens number
    [i * width, (i + 1) * width), counted from the row's first (its sinks, then its prompt, then
    its chunks), so a row's blocks do not depend on its batch neighbours. CPU tensors."""

    width: int
    held: torch.Tensor  # (B,) tokens each row holds
    order: torch.Tensor  # (N,) packed tokens, block by block
    bounds: torch.Tensor  # (blocks + 1,): block i rebuilds order[bounds[i]:bounds[i + 1]]
    rows: torch.Tensor  # (N,) each packed token's row
    ranks: torch.Tensor  # (N,) and its number in that row
    # keys' and values' outliers of each block (Packed.outlier_groups), None without outliers
    outliers: tuple[list[torch.Tensor], list[torch.Tensor]] | None

    @property
    def blocks(self) -> int:
        return len(self.bounds) - 1


def block_plan(store: KVStore, width: int) -> BlockPlan:
    """The store's BlockPlan for blocks of `width` tokens (made once a store, kept in its memo)."""
    key = ("blocks", width)
    if key not in store.memo:
        held = store.prompt_lengths() + store.chunks * store.chunk_tokens()  # (B,)
        end = store.prompt_end + store.chunks * store.chunk_tokens()  # where every row's buffer begins
        if store.keys is None:
            rows = ranks = torch.zeros(0, dtype=torch.long)
        else:
            segment, local = store.keys.token_map()
            rows = store.keys.rows[segment]
            ranks = store.keys.starts[segment] + local - (end - held)[rows]
        block = ranks // width
        bounds = torch.zeros(-(-int(held.max()) // width) + 1, dtype=torch.long)
        bounds[1:] = torch.cumsum(torch.bincount(block, minlength=len(bounds) - 1), 0)
        outliers = None
        if store.keys is not None and "outlier_index" in store.keys.data:
            outliers = tuple(side.outlier_groups(block, len(bounds) - 1) for side in (store.keys, store.values))
        store.memo[key] = BlockPlan(width, held, torch.argsort(block, stable=True), bounds, rows, ranks, outliers)
    return store.memo[key]


def store_blocks(store: KVStore, width: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The store's K and V block by block (BlockPlan), each (B, H, n, D) in the model's basis and
    dtype (n <= width, empty slots zero) with (B, n) bool: which slots hold a token."""
    plan = block_plan(store, width)
    heads, dim, dtype, device = _layout(store)
    for i in range(plan.blocks):
        first = i * width
        n = min(width, int(plan.held.max()) - first)
        sides = [torch.zeros(heads, store.batch * n, dim, dtype=dtype, device=device) for _ in range(2)]
        tokens = plan.order[plan.bounds[i]:plan.bounds[i + 1]]
        if len(tokens):  # none: a block of sinks only
            slot = (plan.rows[tokens] * n + plan.ranks[tokens] - first).to(device)
            for j, (out, side) in enumerate(zip(sides, (store.keys, store.values))):
                out.index_copy_(1, slot, side.rebuilt(tokens, None if plan.outliers is None else plan.outliers[j][i]))
        k, v = (t.reshape(heads, store.batch, n, dim).transpose(0, 1) for t in sides)
        if store.sinks is not None:
            k, v = _sinks_in_block(store.sinks, k, v, first)
        filled = torch.arange(first, first + n)[None, :] < plan.held[:, None]  # (B, n)
        yield store.from_basis(k), store.from_basis(v), filled.to(device)


def _layout(store: KVStore) -> tuple[int, int, torch.dtype, torch.device]:
    """A store's kv heads, head_dim, model dtype and device."""
    if store.keys is not None:
        like = next(iter(store.keys.data.values()))  # (H, entries)
        return like.shape[0], store.keys.head_dim, store.keys.dtype, like.device
    _, heads, _, dim = store.sinks.keys.shape
    return heads, dim, store.sinks.keys.dtype, store.sinks.keys.device


def block_bytes(store: KVStore, block_tokens: int | None = None) -> int:
    """Bytes of K and V that the packed torch path builds at once over `store`: its largest
    block in the model dtype and the fp32 copy attention reads (0 for an empty store)."""
    if store.keys is None and store.sinks is None:
        return 0
    plan = block_plan(store, BLOCK_TOKENS if block_tokens is None else block_tokens)
    heads, dim, dtype, _ = _layout(store)
    return 2 * store.batch * heads * min(plan.width, int(plan.held.max())) * dim * (dtype.itemsize + 4)


def _sinks_in_block(sinks: SinkPart, k: torch.Tensor, v: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, H, n, D) of a block from a row's token `first` on, with the sinks that fall in it
    (a row's sinks are its first tokens; SinkPart keeps row b's in its last counts[b] slots)."""
    kept = sinks.keys.shape[2]
    number = torch.arange(kept)[None, :] - (kept - sinks.counts)[:, None]  # (B, kept) each slot's token number
    row, s = ((number >= max(first, 0)) & (number < first + k.shape[2])).nonzero(as_tuple=True)
    if not len(row):
        return k, v
    pos, row, s = (number[row, s] - first).to(k.device), row.to(k.device), s.to(k.device)
    k, v = k.clone(), v.clone()
    k[row, :, pos] = sinks.keys[row, :, s]
    v[row, :, pos] = sinks.values[row, :, s]
    return k, v


@dataclass
class OnlineSoftmax:
    """softmax(scores) @ V over keys that come block by block (flash-decoding), in fp32:
    rows (B, H, R) of queries; m the largest score so far, l the sum of exp(score - m), acc the
    weighted sum of values."""

    m: torch.Tensor  # (B, H, R, 1)
    l: torch.Tensor  # (B, H, R, 1)  # noqa: E741
    acc: torch.Tensor  # (B, H, R, D)

    @classmethod
    def start(cls, batch: int, heads: int, rows: int, dim: int, device: torch.device) -> OnlineSoftmax:
        return cls(torch.full((batch, heads, rows, 1), float("-inf"), device=device),
                   torch.zeros(batch, heads, rows, 1, device=device), torch.zeros(batch, heads, rows, dim, device=device))

    def step(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores (B, H, R, n) fp32, -inf where not visible; values (B, H, n, D) fp32."""
        m = torch.maximum(self.m, scores.amax(-1, keepdim=True))
        shift = m.masked_fill(m == float("-inf"), 0.0)  # nothing visible yet: exp(-inf) stays 0
        p = torch.exp(scores - shift)
        keep = torch.exp(self.m - shift)
        self.m, self.l, self.acc = m, self.l * keep + p.sum(-1, keepdim=True), self.acc * keep + p @ values

    def result(self) -> torch.Tensor:
        return self.acc / self.l


def decode_attention_torch(q: torch.Tensor, store: KVStore | None, k_buf: torch.Tensor | None,
                           v_buf: torch.Tensor | None, scale: float, block_tokens: int | None = None) -> torch.Tensor:
    """The packed torch path, the reference of packed Triton: the store's K and V rebuilt
    `block_tokens` (default BLOCK_TOKENS) tokens of each row at a time (in the model's basis,
    whatever rotation the store holds them in), then the buffer, through one online softmax; so
    what it builds beside the store is one block, whatever the context's length.

    GQA groups query heads onto their kv head (a reshape of q), K/V are never repeated.
    """
    p = check_decode_inputs(q, store, k_buf, v_buf, scale)
    block_tokens = BLOCK_TOKENS if block_tokens is None else block_tokens
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be a positive number of tokens, got {block_tokens}")
    batch, heads, q_len, dim = p.batch, p.kv_heads, p.q_len, p.head_dim
    qg = q.float().reshape(batch, heads, p.ratio * q_len, dim)  # rows: (group member, query)
    state = OnlineSoftmax.start(batch, heads, p.ratio * q_len, dim, q.device)
    if store is not None and (store.keys is not None or store.sinks is not None):
        for keys, values, filled in store_blocks(store, block_tokens):
            scores = (qg @ keys.float().transpose(-1, -2)) * scale  # (batch, heads, rows, n)
            state.step(scores.masked_fill(~filled[:, None, None, :], float("-inf")), values.float())
    if p.n_buf:
        # query i (of q_len) is the buffer's token n_buf - q_len + i and sees the buffer up to it
        query = torch.arange(p.ratio * q_len, device=q.device) % q_len
        hidden = torch.arange(p.n_buf, device=q.device)[None, :] > (p.n_buf - q_len + query)[:, None]  # (rows, n_buf)
        scores = (qg @ k_buf.float().transpose(-1, -2)) * scale
        state.step(scores.masked_fill(hidden, float("-inf")), v_buf.float())
    return state.result().reshape(batch, p.q_heads, q_len, dim).to(q.dtype)
