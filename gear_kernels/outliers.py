"""Sparse outliers: the signed tails of a chunk, kept exactly."""

from __future__ import annotations

import math

import torch


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest signed integer type that indexes `numel` entries."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if numel - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def outlier_count(numel: int, ratio: float) -> int:
    """Entries per tail: ceil(ratio / 2 * numel), so that both tails never overlap."""
    return min(math.ceil(ratio / 2 * numel), numel // 2)


def select_outliers(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """x (rows, numel) fp32 -> indices (rows, 2k) int64 of its k largest and k smallest entries."""
    k = outlier_count(x.shape[-1], ratio)
    top = x.topk(k, dim=-1, largest=True).indices
    # The bottom tail is chosen among the rest, so a tie can never pick an entry twice.
    rest = x.scatter(-1, top, math.inf)
    bottom = rest.topk(k, dim=-1, largest=False).indices
    return torch.cat([top, bottom], dim=-1)
