"""Compress and decompress one KV chunk: X ~ D (quantized) + S (outliers) + L (low-rank).

A chunk is (batch, kv_heads, tokens, head_dim); each (batch row, head) slice is compressed on
its own. DESIGN.md section 2 gives the semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .config import GearConfig
from .lowrank import factor, power_iteration, quantize_factor
from .outliers import index_dtype, select_outliers
from .packing import pack, unpack
from .quantize import FP16_MAX, dequantize, quantize

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("key", "value")


def grouping(kind: str, backbone: str, group_size: int, tokens: int, head_dim: int) -> tuple[bool, int]:
    """(per_channel, group): whether groups run along tokens (one channel) or along channels
    (one token), and how many entries a group holds."""
    if backbone == "kivi":
        return (True, group_size) if kind == "key" else (False, group_size)
    if backbone == "kcvt":
        return (True, tokens) if kind == "key" else (False, head_dim)
    return False, group_size  # flexgen: keys and values per token


@dataclass
class CompressedChunk:
    """Only the stored tensors, plus the few integers needed to read them back.

    codes: (batch, heads, tokens, bytes) uint8, each token's head_dim codes packed (packing.py).
    scale, zero: fp16, (batch, heads, head_dim, n_groups) when per_channel (groups along
    tokens) else (batch, heads, tokens, n_groups).
    outlier_values (batch, heads, n) in the input dtype (or fp16, outlier_dtype=fp16);
    outlier_index (batch, heads, n) flat positions in the (tokens, head_dim) slice.
    lowrank_a (batch, heads, tokens, r) and lowrank_b (batch, heads, head_dim, r), fp16, or int8
    (lowrank_dtype=int8) with lowrank_a_scale and lowrank_b_scale (batch, heads, 1, r) fp16, one
    per column (lowrank.quantize_factor).
    exact: the input itself, for method none (bits, per_channel and group are then 0, False, 0).
    """

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    bits: int
    per_channel: bool
    group: int
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None
    lowrank_a_scale: torch.Tensor | None = None
    lowrank_b_scale: torch.Tensor | None = None
    exact: torch.Tensor | None = None

    COMPONENTS = {
        "codes": ("codes",),
        "scales": ("scale", "zero"),
        "outliers": ("outlier_values", "outlier_index"),
        "lowrank": ("lowrank_a", "lowrank_b", "lowrank_a_scale", "lowrank_b_scale"),
        "exact": ("exact",),
    }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def nbytes(self, by_component: bool = False) -> int | dict[str, int]:
        """Bytes actually stored, in total or by component."""
        stored = {name: t.numel() * t.element_size() for name, t in self.tensors().items()}
        parts = {c: sum(stored.get(n, 0) for n in names) for c, names in self.COMPONENTS.items()}
        return parts if by_component else sum(parts.values())

    def select_rows(self, index: torch.Tensor) -> "CompressedChunk":
        """The chunk of the batch rows `index` (beam search reorders rows with it)."""
        moved = {name: t.index_select(0, index.to(t.device)) for name, t in self.tensors().items()}
        shape = (len(index),) + tuple(self.shape[1:])
        return CompressedChunk(shape, self.dtype, self.bits, self.per_channel, self.group, **moved)


def _check_input(x: torch.Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed 'key' or 'value'")
    if x.dim() != 4:
        raise ValueError(f"expected (batch, kv_heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"cannot compress an empty chunk of shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"dtype {x.dtype} is not supported: use float32, float16 or bfloat16")


def quantize_pack_torch(
    x: torch.Tensor, exclude: torch.Tensor | None, bits: int, group: int, per_channel: bool,
    want_residual: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (rows, T, D) -> codes (rows, T, bytes), scale and zero fp16 ((rows, D, n_groups) if
    per_channel else (rows, T, n_groups)), residual x - dequantized (rows, T, D) fp32 or None.

    exclude (rows, T*D) bool or None: entries left out of the min/max (outliers), residual 0.
    The torch reference of triton_quantize.quantize_pack.
    """
    rows, tokens, head_dim = x.shape
    xf = x.float()
    skip = None if exclude is None else exclude.bool().reshape(rows, tokens, head_dim)
    codes, scale, zero = quantize(
        _to_groups(xf, per_channel), None if skip is None else _to_groups(skip, per_channel), bits, group
    )
    packed = pack(_from_groups(codes, per_channel), bits)  # (rows, T, bytes)
    if not want_residual:
        return packed, scale, zero, None
    residual = xf - _from_groups(dequantize(codes, scale, zero, group), per_channel)
    return packed, scale, zero, residual if skip is None else torch.where(skip, 0.0, residual)


def compress(
    x: torch.Tensor, config: GearConfig, kind: str, rank: int | None = None, quantize_pack=quantize_pack_torch
) -> CompressedChunk:
    """x (batch, kv_heads, tokens, head_dim) -> CompressedChunk; rank defaults to the prompt rank.

    quantize_pack: the quantization step, quantize_pack_torch or its Triton twin (same output).
    NaN or Inf anywhere in x is refused with a ValueError: a non-finite entry would corrupt the
    scale of its group and the low-rank factors of its whole slice.
    """
    _check_input(x, kind)
    batch, heads, tokens, head_dim = x.shape
    if not config.compresses:
        return CompressedChunk(tuple(x.shape), x.dtype, 0, False, 0, exact=x.clone())
    codec = config.codec
    bits = codec.bits_for(kind)
    per_channel, group = grouping(kind, codec.backbone, codec.group_size, tokens, head_dim)
    meta = dict(shape=tuple(x.shape), dtype=x.dtype, bits=bits, per_channel=per_channel, group=group)
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
    parts: dict[str, torch.Tensor] = {}

    exclude = None
    if codec.uses_outliers:
        flat = xs.reshape(batch * heads, -1)
        index = select_outliers(flat.float(), codec.outlier_ratio)  # (rows, 2k), ascending
        exclude = torch.zeros(flat.shape, dtype=torch.bool, device=x.device).scatter_(-1, index, True)
        values = flat.gather(-1, index)
        if codec.outlier_dtype == "fp16":
            values = _to_fp16(values, kind)
        parts["outlier_values"] = values.reshape(batch, heads, -1)
        parts["outlier_index"] = index.to(index_dtype(tokens * head_dim)).reshape(batch, heads, -1)

    want_lowrank = codec.uses_lowrank and r > 0
    codes, scale, zero, residual = quantize_pack(xs, exclude, bits, group, per_channel, want_lowrank)
    parts.update(codes=codes.reshape(batch, heads, tokens, -1), scale=scale.reshape(batch, heads, *scale.shape[1:]),
                 zero=zero.reshape(batch, heads, *zero.shape[1:]))
    if want_lowrank:
        a, b = power_iteration(residual, r, codec.power_iters, config.seed)
        for name, f, length in (("lowrank_a", a, tokens), ("lowrank_b", b, head_dim)):
            if codec.lowrank_dtype == "int8":
                f, f_scale = quantize_factor(f)
                parts[f"{name}_scale"] = f_scale.reshape(batch, heads, 1, -1)
            parts[name] = f.to(torch.float16 if codec.lowrank_dtype == "fp16" else torch.int8).reshape(
                batch, heads, length, -1)
    return CompressedChunk(**meta, **parts)


def _to_fp16(values: torch.Tensor, kind: str) -> torch.Tensor:
    """Outlier values -> fp16, refusing any beyond its range (the cast would make them inf)."""
    beyond = values.abs() > FP16_MAX
    if bool(beyond.any()):
        raise ValueError(
            f"{int(beyond.sum())} {kind} outliers beyond the fp16 range (largest |x| "
            f"{values.abs().max().item():.6g} > {FP16_MAX:.0f}) cannot be stored with outlier_dtype=fp16; "
            "use outlier_dtype=model"
        )
    return values.to(torch.float16)


def decompress(chunk: CompressedChunk) -> torch.Tensor:
    """CompressedChunk -> (batch, kv_heads, tokens, head_dim) in the input's dtype."""
    if chunk.exact is not None:
        return chunk.exact
    batch, heads, tokens, head_dim = chunk.shape
    codes = unpack(chunk.codes, chunk.bits, head_dim)
    out = _from_groups(dequantize(_to_groups(codes, chunk.per_channel), chunk.scale, chunk.zero, chunk.group),
                       chunk.per_channel)
    if chunk.lowrank_a is not None:
        out = out + lowrank_product(factor(chunk.lowrank_a, chunk.lowrank_a_scale),
                                    factor(chunk.lowrank_b, chunk.lowrank_b_scale))
    # The scale is rounded up, so the top code of a group reaching the dtype's maximum lands a
    # little beyond it: clamp, or the cast makes it inf.
    finite = torch.finfo(chunk.dtype).max
    flat = out.clamp(-finite, finite).to(chunk.dtype).reshape(batch, heads, -1)
    if chunk.outlier_values is not None:
        # Not in place: per-channel groups leave `out` transposed, so `flat` may be a copy.
        flat = flat.scatter(-1, chunk.outlier_index.long(), chunk.outlier_values.to(chunk.dtype))
    return flat.reshape(chunk.shape)


def lowrank_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., T, r), b (..., D, r) -> A B^T (..., T, D) in fp32.

    One rank at a time, by elementwise products and sums: each entry is then computed the same
    way whatever the shape around it (a matmul may block and round differently by shape), so a
    row reconstructs bitwise alike alone and inside a batch, on every path that uses this.
    """
    out = a[..., :, None, 0].float() * b[..., None, :, 0].float()
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, None, k].float() * b[..., None, :, k].float()
    return out


def _to_groups(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> the layout whose last axis holds the groups."""
    return x.transpose(-1, -2) if per_channel else x


_from_groups = _to_groups  # the transpose is its own inverse


def bits_per_element(chunk: CompressedChunk) -> float:
    return 8 * chunk.nbytes() / math.prod(chunk.shape)
