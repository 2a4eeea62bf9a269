"""Groupwise asymmetric min-max quantization along the last axis.

Each group of `group` consecutive entries of the last axis gets its own fp16 scale and zero
point (the group minimum). Entries flagged in `exclude` (outliers, padding of a partial last
group) take no part in the min and max, so they cannot stretch the range; they still get a
code, which the caller overwrites or ignores.
"""

from __future__ import annotations

import math

import torch

FP16_MAX = torch.finfo(torch.float16).max


def levels(bits: int) -> int:
    """Largest code: 2^b - 1 (the original code's b^2 - 1 is wrong past 4 bits)."""
    return (1 << bits) - 1


def round_fp16(x: torch.Tensor, toward: float) -> torch.Tensor:
    """fp32 -> fp16, rounding toward +inf or -inf instead of to nearest."""
    h = x.to(torch.float16)
    off = h.float() < x if toward > 0 else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, toward)), h)


def _grouped(x: torch.Tensor, group: int, fill: float) -> torch.Tensor:
    """(..., L) -> (..., n_groups, group), the partial last group padded with `fill`."""
    n_groups = math.ceil(x.shape[-1] / group)
    pad = n_groups * group - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad), value=fill).reshape(*x.shape[:-1], n_groups, group)


def quantize(
    x: torch.Tensor, exclude: torch.Tensor | None, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., L) fp32 -> codes (..., L) uint8, scale (..., n_groups) fp16, zero (..., n_groups) fp16.

    Every entry not excluded dequantizes to within half a step (scale / 2) of its value:
    the zero point is rounded down and the scale up when they are stored in fp16.
    """
    assert x.dtype == torch.float32, "quantize works in fp32"
    if exclude is None:
        exclude = torch.zeros_like(x, dtype=torch.bool)
    top = levels(bits)
    lo = _grouped(torch.where(exclude, math.inf, x), group, math.inf).amin(dim=-1)  # (..., n_groups)
    hi = _grouped(torch.where(exclude, -math.inf, x), group, -math.inf).amax(dim=-1)
    empty = torch.isinf(lo)  # every entry of the group excluded
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 0.0, hi)
    zero = round_fp16(lo, -math.inf)
    # Divide by a tensor, not a Python number: CUDA computes x / number as x * (1 / number),
    # which is not IEEE division and would round some scales up one fp16 step too far.
    scale = round_fp16((hi - zero.float()) / torch.full_like(hi, top), math.inf)
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError(
            f"values beyond the fp16 range (|x| > {FP16_MAX:.0f}) cannot be quantized with fp16 "
            "scales; use method=none for this model"
        )
    safe = torch.where(scale > 0, scale.float(), 1.0)  # a constant group has scale 0: code 0
    steps = (x - _expand(zero.float(), group, x.shape[-1])) / _expand(safe, group, x.shape[-1])
    codes = steps.round().clamp(0, top).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """codes (..., L), scale and zero (..., n_groups) -> (..., L) fp32."""
    length = codes.shape[-1]
    grid = _grouped(codes.float(), group, 0.0)  # (..., n_groups, group)
    return dequantize_entries(grid, scale.unsqueeze(-1), zero.unsqueeze(-1)).flatten(-2)[..., :length]


def dequantize_entries(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """code * scale + zero in fp32, broadcasting; a product and a sum, each rounded on its own
    (no fused multiply-add), so that every path computes every entry alike: the cache's layer
    store, chunk.decompress and the Triton kernels (compiled without FP fusion)."""
    return codes.float() * scale.float() + zero.float()


def _expand(per_group: torch.Tensor, group: int, length: int) -> torch.Tensor:
    """(..., n_groups) -> (..., length): each group's value repeated over its entries."""
    return per_group.repeat_interleave(group, dim=-1)[..., :length]
