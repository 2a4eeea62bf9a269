"""Compress and decompress one KV chunk: a quantizer's codes D, GEAR's corrections L and S.

A chunk is (batch, kv_heads, tokens, head_dim); each (batch row, head) slice is compressed on
its own: its outliers S taken out (kept exactly), the rest quantized by the codec's quantizer
(quantizers/), the quantization error approximated by a low-rank L (corrections/). DESIGN.md
section 2 gives the semantics; `rebuild` is the one reconstruction every path computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import GearConfig
from .corrections import lowrank, outliers
from .quantizers import QUANTIZERS, Field, Quantizer

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("key", "value")
ROWS_ELEMENTS = 1 << 20  # entries of the slices compressed together in one pass (a prompt's slice: all of it)
EXACT = (Field("exact", "exact", "token"),)  # method none keeps the chunk as it is


def quantizer_for(config: GearConfig, kind: str) -> Quantizer:
    """The quantizer the config's codec uses for kind 'key' or 'value'."""
    codec = config.codec
    return QUANTIZERS[codec.backbone].from_codec(codec, kind)


@dataclass
class CompressedChunk:
    """The stored tensors of a chunk of shape (B, H, T, D), each (B, H, items, *inner) with its
    items along its field's axis (quantizers/base.py), and how to read them back.

    quantizer: what made the codes (None: method none, parts {"exact": the input}).
    token_group: tokens an item of a 'group' field covers (0: none).
    """

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    quantizer: Quantizer | None
    token_group: int
    parts: dict[str, torch.Tensor]

    def fields(self) -> tuple[Field, ...]:
        """The table of what this chunk stores, in a fixed order."""
        if self.quantizer is None:
            return EXACT
        return tuple(f for f in (*self.quantizer.fields, *outliers.FIELDS, *lowrank.FIELDS) if f.name in self.parts)

    def nbytes(self, by_component: bool = False) -> int | dict[str, int]:
        """Bytes actually stored, in total or by component."""
        parts: dict[str, int] = {}
        for f in self.fields():
            t = self.parts[f.name]
            parts[f.component] = parts.get(f.component, 0) + t.numel() * t.element_size()
        return parts if by_component else sum(parts.values())

    def select_rows(self, index: torch.Tensor) -> "CompressedChunk":
        """The chunk of the batch rows `index` (beam search reorders rows with it)."""
        moved = {name: t.index_select(0, index.to(t.device)) for name, t in self.parts.items()}
        return CompressedChunk((len(index), *self.shape[1:]), self.dtype, self.quantizer, self.token_group, moved)


def _check_input(x: torch.Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed 'key' or 'value'")
    if x.dim() != 4:
        raise ValueError(f"expected (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"cannot compress an empty chunk of shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"dtype {x.dtype} is not supported: use float32, float16 or bfloat16")


def compress(x: torch.Tensor, config: GearConfig, kind: str, rank: int | None = None,
             kernel: str = "torch") -> CompressedChunk:
    """x (batch, kv_heads, tokens, head_dim) -> CompressedChunk; rank defaults to the prompt rank.

    kernel: 'torch' (the reference) or 'triton' (the quantizer's Triton encode, same bytes).
    NaN or Inf anywhere in x is refused with a ValueError: a non-finite entry would corrupt the
    scale of its group and the low-rank factors of its whole slice.
    """
    _check_input(x, kind)
    batch, heads, tokens, head_dim = x.shape
    if not config.compresses:
        return CompressedChunk(tuple(x.shape), x.dtype, None, 0, {"exact": x.clone()})
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(
            f"{bad} NaN/Inf entries in the {kind} chunk of shape {tuple(x.shape)}: GEAR refuses "
            "non-finite input (it would poison its neighbours); run the model in a wider dtype "
            "(bfloat16 or float32) or use method=none"
        )
    r = config.rank(prompt=True) if rank is None else rank
    if r < 0:
        raise ValueError(f"rank={r} is invalid: allowed an integer >= 0")
    xs = x.reshape(batch * heads, tokens, head_dim).contiguous()  # one row per (batch, head) slice
    # Slices are compressed each on its own, so a long prompt's are taken a few at a time: its
    # temporaries (several fp32 copies of what a pass takes) stay a small multiple of one slice.
    step = max(1, ROWS_ELEMENTS // (tokens * head_dim))
    passes = [_compress_rows(xs[i:i + step], config, kind, r, kernel) for i in range(0, len(xs), step)]
    parts = {name: torch.cat([p[name] for p in passes]) for name in passes[0]}
    parts = {name: t.reshape(batch, heads, *t.shape[1:]) for name, t in parts.items()}
    quantizer = quantizer_for(config, kind)
    return CompressedChunk(tuple(x.shape), x.dtype, quantizer, quantizer.token_group(tokens), parts)


def _compress_rows(xs: torch.Tensor, config: GearConfig, kind: str, r: int, kernel: str) -> dict[str, torch.Tensor]:
    """Slices xs (R, T, D) -> their stored fields, (R, items, *inner) each."""
    tokens, head_dim = xs.shape[1:]
    codec, quantizer = config.codec, quantizer_for(config, kind)
    parts, taken = {}, None
    if codec.uses_outliers:
        parts, taken = outliers.encode(xs, codec.outlier_ratio, codec.outlier_dtype, kind)
    coded = quantizer.encode(xs, taken, kernel)
    parts.update(coded)
    if codec.uses_lowrank and r > 0:
        residual = xs.float() - quantizer.decode(_aligned(coded, quantizer, tokens), head_dim)
        if taken is not None:
            residual = torch.where(taken, 0.0, residual)
        parts.update(lowrank.encode(residual, r, codec.power_iters, config.seed, codec.lowrank_dtype))
    return parts


def _aligned(coded: dict[str, torch.Tensor], quantizer: Quantizer, tokens: int) -> dict[str, torch.Tensor]:
    """A slice's quantizer fields (R, items, ...) -> one item a token (R, T, ...)."""
    token = torch.arange(tokens, device=next(iter(coded.values())).device)
    item = {"token": token, "group": token // max(quantizer.token_group(tokens), 1), "segment": token * 0}
    return {f.name: coded[f.name].index_select(1, item[f.axis]) for f in quantizer.fields}


def rebuild(quantizer: Quantizer, aligned: dict[str, torch.Tensor], factors: tuple | None, head_dim: int,
            dtype: torch.dtype) -> torch.Tensor:
    """D + L in the model dtype, (..., T, D): the one reconstruction (chunks and the store).

    aligned: the quantizer's fields, one item a token (..., T, ...); factors: None, or A (..., T, r)
    and B (..., S, D, r) in fp32 with (T,) the item of B of each token. Outliers are the caller's
    to write over the result (corrections.outliers.apply).
    """
    out = quantizer.decode(aligned, head_dim)
    if factors is not None:
        a, b, segment = factors
        out = out + lowrank.product(a, b, segment)
    # The scale is rounded up, so the top code of a group reaching the dtype's maximum lands a
    # little beyond it: clamp, or the cast makes it inf.
    finite = torch.finfo(dtype).max
    return out.clamp(-finite, finite).to(dtype)


def decompress(chunk: CompressedChunk) -> torch.Tensor:
    """CompressedChunk -> (batch, kv_heads, tokens, head_dim) in the input's dtype."""
    if chunk.quantizer is None:
        return chunk.parts["exact"]
    batch, heads, tokens, head_dim = chunk.shape
    flat = {name: t.reshape(batch * heads, *t.shape[2:]) for name, t in chunk.parts.items()}
    factors = None
    if "lowrank_a" in flat:
        a = lowrank.factor(flat["lowrank_a"], flat.get("lowrank_a_scale"))
        b_scale = flat.get("lowrank_b_scale")
        b = lowrank.factor(flat["lowrank_b"], None if b_scale is None else b_scale[:, :, None])
        factors = (a, b, torch.zeros(tokens, dtype=torch.long, device=a.device))
    out = rebuild(chunk.quantizer, _aligned(flat, chunk.quantizer, tokens), factors, head_dim, chunk.dtype)
    out = out.reshape(batch * heads, -1)
    if "outlier_values" in flat:
        out = outliers.apply(out, flat["outlier_values"], flat["outlier_index"])
    return out.reshape(chunk.shape)


def bits_per_element(chunk: CompressedChunk) -> float:
    return 8 * chunk.nbytes() / math.prod(chunk.shape)
