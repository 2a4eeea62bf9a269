"""Sparse outliers: the signed tails of a chunk, kept exactly beside its codes.

Stored per slice (a row's chunk of one kv head), as lists whose length the chunk's size sets:
`outlier_values` (model dtype, or fp16), `outlier_index` (flat t * D + d in the slice, ascending,
the narrowest integer type that fits) and `outlier_bucket` (int32, ceil(T / BUCKET) + 1 entries:
entry j counts the outliers of tokens before j * BUCKET), so that a decode tile finds its own
outliers between two offsets, with no search (triton_attention.py).
"""

from __future__ import annotations

import math

import torch

from ..quantize import FP16_MAX
from ..quantizers.base import Field

FIELDS = (Field("outlier_values", "outliers", "list"), Field("outlier_index", "outliers", "list"),
          Field("outlier_bucket", "outliers", "list"))
BUCKET = 16


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest integer type that indexes `numel` entries (unsigned up to 16 bits: a
    prompt chunk of up to 1024 tokens x 64 channels keeps 2-byte indices)."""
    for dtype, largest in ((torch.uint8, 255), (torch.uint16, 65535), (torch.int32, 2**31 - 1)):
        if numel - 1 <= largest:
            return dtype
    return torch.int64


def outlier_count(numel: int, ratio: float) -> int:
    """Entries per tail: ceil(ratio / 2 * numel), never more than half the chunk."""
    # round first: 0.14 / 2 * 100 is 7.000000000000001 in floating point
    return min(math.ceil(round(ratio / 2 * numel, 9)), numel // 2)


def select_outliers(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """x (rows, numel) fp32 -> indices (rows, 2k) int64 of its k largest and k smallest entries,
    sorted ascending."""
    k = outlier_count(x.shape[-1], ratio)
    top = x.topk(k, dim=-1, largest=True).indices
    # The bottom tail is chosen among the rest, so a tie can never pick an entry twice.
    rest = x.scatter(-1, top, math.inf)
    bottom = rest.topk(k, dim=-1, largest=False).indices
    # Ascending flat position (token-major): decode attention walks a token range's outliers as
    # one contiguous run.
    return torch.cat([top, bottom], dim=-1).sort(dim=-1).values


def buckets(index: torch.Tensor, tokens: int, head_dim: int) -> torch.Tensor:
    """Sorted flat indices (..., k) of slices of `tokens` tokens -> (..., ceil(tokens / BUCKET) + 1)
    int32: entry j counts the outliers of tokens before j * BUCKET (the last, all)."""
    bounds = torch.arange(-(-tokens // BUCKET) + 1, device=index.device) * (BUCKET * head_dim)
    bounds = bounds.clamp(max=tokens * head_dim).expand(*index.shape[:-1], -1).contiguous()
    return torch.searchsorted(index.long().contiguous(), bounds).to(torch.int32)


def encode(x: torch.Tensor, ratio: float, dtype: str, kind: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """x (R, T, D) -> the outlier fields (R, 2k) and the mask (R, T, D) bool of the entries taken."""
    rows, tokens, head_dim = x.shape
    flat = x.reshape(rows, -1)
    index = select_outliers(flat.float(), ratio)  # (R, 2k), ascending
    taken = torch.zeros(flat.shape, dtype=torch.bool, device=x.device).scatter_(-1, index, True)
    values = flat.gather(-1, index)
    parts = {"outlier_values": _to_fp16(values, kind) if dtype == "fp16" else values,
             "outlier_index": index.to(index_dtype(tokens * head_dim)),
             "outlier_bucket": buckets(index, tokens, head_dim)}
    return parts, taken.reshape(x.shape)


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


def apply(out: torch.Tensor, values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """out (..., n) in the model dtype with `values` written at flat positions `where` (..., k)."""
    return out.scatter(-1, where.long(), values.to(out.dtype))
