"""Decode attention over a GEAR-compressed KV cache: input checks and the torch reference.

The cache of one layer is a sequence of *segments* in position order, then an exact buffer:

- a segment is either a `CompressedChunk` of shape (batch, kv_heads, tokens, head_dim), shared
  by every batch row (positions are the same for all rows), or a per-row segment: a list of
  `batch` entries, each a batch-1 `CompressedChunk` or None (no tokens), e.g. a prompt stored
  row by row with each row's left padding stripped. Rows of a per-row segment may differ in
  length; a row's positions are the concatenation of its own pieces.
- the buffer k_buf / v_buf (batch, kv_heads, n_buf, head_dim) holds the latest tokens exactly.

Attention for query heads q (batch, q_heads, q_len, head_dim), q_heads = kv_heads * ratio
(query head j reads kv head j // ratio, as transformers' repeat_kv):

    out = softmax(q K^T * scale + mask) V,   K, V = reconstruct(segments) ++ buffer

computed in fp32 and returned in q's dtype. Masked: positions < pad_len[b] of row b (left
padding, only with shared segments), and for q_len > 1 the causal rule: query i (of q_len) is
the token at position n_b - q_len + i of its row (n_b = the row's length) and sees positions
up to its own.

Reconstruction here is fp32 throughout: D + L with the outlier entries replaced by their exact
values (chunk.decompress rounds D + L to the model dtype first; the difference is that one
rounding). The Triton path (triton_attention.py) computes the same thing without building K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .chunk import CompressedChunk, _from_groups, _to_groups
from .packing import unpack
from .quantize import dequantize

Segment = Union[CompressedChunk, Sequence[Union[CompressedChunk, None]]]
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
    row_lengths: tuple[int, ...]  # tokens each row attends to (segments + buffer)

    @property
    def ratio(self) -> int:
        return self.q_heads // self.kv_heads


def is_per_row(segment: Segment) -> bool:
    return not isinstance(segment, CompressedChunk)


def _check_chunk(chunk: CompressedChunk, batch: int, kv_heads: int, head_dim: int, dtype, what: str) -> None:
    if not isinstance(chunk, CompressedChunk):
        raise TypeError(f"{what}: expected a CompressedChunk, got {type(chunk).__name__}")
    b, h, _, d = chunk.shape
    if (b, h, d) != (batch, kv_heads, head_dim):
        raise ValueError(
            f"{what}: chunk shape {tuple(chunk.shape)} does not fit batch {batch}, kv_heads "
            f"{kv_heads}, head_dim {head_dim}"
        )
    if chunk.dtype != dtype:
        raise ValueError(f"{what}: chunk dtype {chunk.dtype} differs from the query dtype {dtype}")


def check_decode_inputs(
    q: torch.Tensor,
    key_segments: Sequence[Segment],
    value_segments: Sequence[Segment],
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    scale: float,
    pad_len: torch.Tensor | None = None,
) -> DecodeProblem:
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
    if len(key_segments) != len(value_segments):
        raise ValueError(f"{len(key_segments)} key segments but {len(value_segments)} value segments")
    if (k_buf is None) != (v_buf is None):
        raise ValueError("give both k_buf and v_buf, or neither")
    kv_heads = None
    if k_buf is not None:
        if k_buf.dim() != 4 or k_buf.shape != v_buf.shape:
            raise ValueError(f"k_buf {tuple(k_buf.shape)} and v_buf {tuple(v_buf.shape)} must be equal 4-d shapes")
        if k_buf.shape[0] != batch or k_buf.shape[-1] != head_dim:
            raise ValueError(f"buffer shape {tuple(k_buf.shape)} does not fit q {tuple(q.shape)}")
        if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype:
            raise ValueError(f"buffer dtype {k_buf.dtype}/{v_buf.dtype} differs from the query dtype {q.dtype}")
        if k_buf.device != q.device or v_buf.device != q.device:
            raise ValueError("the buffer and q must be on the same device")
        kv_heads = k_buf.shape[1]
    n_buf = 0 if k_buf is None else k_buf.shape[2]
    if kv_heads is None:  # take it from the first chunk
        for seg in key_segments:
            pieces = [seg] if not is_per_row(seg) else [c for c in seg if c is not None]
            if pieces:
                kv_heads = pieces[0].shape[1]
                break
    if kv_heads is None:
        raise ValueError("nothing to attend to: no chunks and no buffer")
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads}")

    lengths = [n_buf] * batch
    any_per_row = False
    for i, (ks, vs) in enumerate(zip(key_segments, value_segments)):
        if is_per_row(ks) != is_per_row(vs):
            raise ValueError(f"segment {i}: keys and values must both be shared chunks or both per-row lists")
        if not is_per_row(ks):
            _check_chunk(ks, batch, kv_heads, head_dim, q.dtype, f"key segment {i}")
            _check_chunk(vs, batch, kv_heads, head_dim, q.dtype, f"value segment {i}")
            if ks.shape != vs.shape:
                raise ValueError(f"segment {i}: key chunk {tuple(ks.shape)} and value chunk {tuple(vs.shape)} differ")
            lengths = [n + ks.shape[2] for n in lengths]
            continue
        any_per_row = True
        if len(ks) != batch or len(vs) != batch:
            raise ValueError(f"per-row segment {i} must hold one entry per batch row ({batch})")
        for row, (kc, vc) in enumerate(zip(ks, vs)):
            if (kc is None) != (vc is None):
                raise ValueError(f"per-row segment {i}, row {row}: key and value must both be present or None")
            if kc is None:
                continue
            _check_chunk(kc, 1, kv_heads, head_dim, q.dtype, f"key segment {i} row {row}")
            _check_chunk(vc, 1, kv_heads, head_dim, q.dtype, f"value segment {i} row {row}")
            if kc.shape != vc.shape:
                raise ValueError(f"segment {i} row {row}: key {tuple(kc.shape)} and value {tuple(vc.shape)} differ")
            lengths[row] += kc.shape[2]
    if pad_len is not None:
        if any_per_row:
            raise ValueError("pad_len applies to shared segments only; per-row segments carry no padding")
        if not isinstance(pad_len, torch.Tensor) or pad_len.shape != (batch,) or pad_len.is_floating_point():
            raise ValueError(f"pad_len must be an integer tensor of shape ({batch},)")
    for row, n in enumerate(lengths):
        if n < q_len:
            raise ValueError(f"row {row} holds {n} tokens, fewer than the {q_len} queries")
    if pad_len is not None and pad_len.device.type == "cpu":  # checked without a device sync only
        for row, (pad, n) in enumerate(zip(pad_len.tolist(), lengths)):
            if not 0 <= pad <= n - q_len:
                raise ValueError(f"pad_len[{row}]={pad} leaves the queries nothing to see: row {row} holds {n} tokens")
    return DecodeProblem(batch, kv_heads, q_heads, q_len, head_dim, n_buf, tuple(lengths))


def reconstruct(chunk: CompressedChunk) -> torch.Tensor:
    """CompressedChunk -> (batch, heads, tokens, head_dim) fp32: D + L, outlier entries exact."""
    if chunk.exact is not None:
        return chunk.exact.float()
    batch, heads, tokens, head_dim = chunk.shape
    codes = unpack(chunk.codes, chunk.bits, tokens * head_dim).reshape(chunk.shape)
    grid = dequantize(_to_groups(codes, chunk.per_channel), chunk.scale, chunk.zero, chunk.group)
    out = _from_groups(grid, chunk.per_channel).contiguous()
    if chunk.lowrank_a is not None:
        out = out + chunk.lowrank_a.float() @ chunk.lowrank_b.float().transpose(-1, -2)
    if chunk.outlier_values is not None:
        out.reshape(batch, heads, -1).scatter_(-1, chunk.outlier_index.long(), chunk.outlier_values.float())
    return out


def _row_pieces(segments: Sequence[Segment], batch: int) -> list[list[torch.Tensor]]:
    """Per batch row, the fp32 (heads, tokens, head_dim) reconstructions of its segments, in order."""
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for seg in segments:
        if not is_per_row(seg):
            full = reconstruct(seg)
            for b in range(batch):
                rows[b].append(full[b])
        else:
            for b, chunk in enumerate(seg):
                if chunk is not None:
                    rows[b].append(reconstruct(chunk)[0])
    return rows


def decode_attention_torch(
    q: torch.Tensor,
    key_segments: Sequence[Segment],
    value_segments: Sequence[Segment],
    k_buf: torch.Tensor | None,
    v_buf: torch.Tensor | None,
    scale: float,
    pad_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch path (and reference): reconstruct in fp32, then masked softmax attention.

    GQA groups query heads onto their kv head (a reshape of q), K/V are never repeated.
    """
    p = check_decode_inputs(q, key_segments, value_segments, k_buf, v_buf, scale, pad_len)
    batch, heads, q_len, dim = p.batch, p.kv_heads, p.q_len, p.head_dim
    keys = _row_pieces(key_segments, batch)
    values = _row_pieces(value_segments, batch)
    if k_buf is not None:
        for b in range(batch):
            keys[b].append(k_buf[b].float())
            values[b].append(v_buf[b].float())
    longest = max(p.row_lengths)
    k_all = q.new_zeros((batch, heads, longest, dim), dtype=torch.float32)
    v_all = torch.zeros_like(k_all)
    for b in range(batch):
        n = p.row_lengths[b]
        k_all[b, :, :n] = torch.cat(keys[b], dim=-2)
        v_all[b, :, :n] = torch.cat(values[b], dim=-2)

    qg = q.float().reshape(batch, heads, p.ratio * q_len, dim)  # rows: (group member, query)
    scores = (qg @ k_all.transpose(-1, -2)) * scale  # (batch, heads, rows, longest)
    pos = torch.arange(longest, device=q.device)
    length = torch.tensor(p.row_lengths, device=q.device)
    query = torch.arange(p.ratio * q_len, device=q.device) % q_len
    # query i of row b sits at position length[b] - q_len + i and sees positions up to it
    last = length[:, None] - q_len + query[None, :]  # (batch, rows)
    visible = pos[None, None, :] <= last[:, :, None]  # (batch, rows, longest)
    if pad_len is not None:
        visible = visible & (pos[None, None, :] >= pad_len.to(q.device)[:, None, None])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v_all  # (batch, heads, rows, dim)
    return out.reshape(batch, p.q_heads, q_len, dim).to(q.dtype)
