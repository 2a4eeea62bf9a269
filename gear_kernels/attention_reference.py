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
from dataclasses import dataclass

import torch

from .store import KVStore

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
    prompt_tokens: int  # positions of the prompt region (rows hold their last lengths[b] of them)
    stream_tokens: int

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
    prompt_tokens = stream_tokens = 0
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
        if store.has_prompt:
            prompt_tokens = store.prompt_end - store.prompt_start
        stream_tokens = store.chunks * store.chunk_tokens()
    if kv_heads is None:
        raise ValueError("nothing to attend to: no store and no buffer")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")
    if q_len > n_buf and q_len > 1:
        raise ValueError(f"{q_len} queries need their own tokens in the buffer, which holds {n_buf}")
    return DecodeProblem(batch, kv_heads, q_heads, q_len, head_dim, n_buf, prompt_tokens, stream_tokens)


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


def decode_attention_torch(q: torch.Tensor, store: KVStore | None, k_buf: torch.Tensor | None,
                           v_buf: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The packed torch path, the reference of packed Triton: rebuild the store's K and V (in the
    model's basis, whatever rotation the store holds them in), then masked softmax attention.

    GQA groups query heads onto their kv head (a reshape of q), K/V are never repeated.
    """
    p = check_decode_inputs(q, store, k_buf, v_buf, scale)
    keys, values = (None, None) if store is None else store.dense()  # (B, H, held, D) in the model dtype
    parts_k = [t for t in (keys, k_buf) if t is not None]
    parts_v = [t for t in (values, v_buf) if t is not None]
    k_all = torch.cat(parts_k, dim=-2).float()
    v_all = torch.cat(parts_v, dim=-2).float()
    total = k_all.shape[-2]
    batch, heads, q_len, dim = p.batch, p.kv_heads, p.q_len, p.head_dim
    qg = q.float().reshape(batch, heads, p.ratio * q_len, dim)  # rows: (group member, query)
    scores = (qg @ k_all.transpose(-1, -2)) * scale  # (batch, heads, rows, total)
    pos = torch.arange(total, device=q.device)
    visible = torch.ones(batch, 1, total, dtype=torch.bool, device=q.device)
    if p.prompt_tokens:  # the positions before a row's first stored prompt token hold nothing
        lead = (p.prompt_tokens - store.prompt_lengths()).to(q.device)  # (batch,)
        visible = visible & ~(pos[None, None, :] < lead[:, None, None])
    # query i (of q_len) is the buffer's token n_buf - q_len + i and sees positions up to it
    query = torch.arange(p.ratio * q_len, device=q.device) % q_len
    last = total - q_len + query  # (rows,)
    visible = visible & (pos[None, None, :] <= last[None, :, None])  # (batch, rows, total)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_all  # (batch, heads, rows, dim)
    return out.reshape(batch, p.q_heads, q_len, dim).to(q.dtype)
