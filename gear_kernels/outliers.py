"""Sparse outliers: the signed tails of a chunk, kept exactly."""

from __future__ import annotations

import math

import torch


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
    # Ascending flat position (token-major): decode attention kernels walk a token range's
    # outliers as one contiguous run (gear_kernels/triton_attention.py).
    return torch.cat([top, bottom], dim=-1).sort(dim=-1).values
