"""Low-rank approximation of the quantization residual by seeded power iteration.

Stored per slice: `lowrank_a` (one row of r a token) and `lowrank_b` (D x r, one a chunk), fp16,
or int8 codes with one fp16 scale a column (`lowrank_a_scale`, `lowrank_b_scale`, r each).
"""

from __future__ import annotations

import math

import torch

from ..quantize import round_fp16
from ..quantizers.base import Field

FIELDS = (Field("lowrank_a", "lowrank", "token"), Field("lowrank_b", "lowrank", "segment"),
          Field("lowrank_a_scale", "lowrank", "segment"), Field("lowrank_b_scale", "lowrank", "segment"))


def power_iteration(
    residual: torch.Tensor, rank: int, iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual (rows, T, D) fp32 -> A (rows, T, r), B (rows, D, r); residual ~ A B^T.

    The start is one seeded (D, r) matrix shared by every row, so a row's factors do not
    depend on its batch neighbours (batch size 1 and N store the same bytes).
    Each singular value is split evenly between A and B (both columns get norm sqrt(sigma)):
    left in B alone it overflows fp16 for large residuals and goes subnormal for tiny ones.
    """
    assert residual.dtype == torch.float32, "power iteration runs in fp32"
    rank = min(rank, residual.shape[-2], residual.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(residual.shape[-1], rank, generator=generator).to(residual.device)
    b = b.expand(residual.shape[0], -1, -1)  # (rows, D, r)
    for _ in range(iters):
        a = torch.linalg.qr(residual @ b).Q  # (rows, T, r)
        b = residual.transpose(-1, -2) @ a  # (rows, D, r)
    sigma = b.norm(dim=-2, keepdim=True)  # (rows, 1, r)
    root = sigma.sqrt()
    return a * root, b / torch.where(root > 0, root, 1.0)


def quantize_factor(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor (..., n, r) fp32 -> int8 codes (..., n, r) and one fp16 scale per column (..., 1, r).

    Symmetric: code = round(f / scale) in [-127, 127], scale = max |column| / 127 rounded up to
    fp16, so no code clips. A zero column gets scale 0 and codes 0.
    """
    assert f.dtype == torch.float32, "factors are quantized from fp32"
    scale = round_fp16(f.abs().amax(dim=-2, keepdim=True) / torch.full_like(f[..., :1, :], 127.0), math.inf)
    safe = torch.where(scale > 0, scale.float(), 1.0)
    return (f / safe).round().clamp(-127, 127).to(torch.int8), scale


def factor(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A stored factor as fp32: fp16 as it is, int8 codes times their column's scale."""
    return codes.float() if scale is None else codes.float() * scale.float()


def encode(residual: torch.Tensor, rank: int, iters: int, seed: int, dtype: str) -> dict[str, torch.Tensor]:
    """residual (R, T, D) fp32 -> lowrank_a (R, T, r), lowrank_b (R, 1, D, r) in fp16, or int8
    with lowrank_a_scale and lowrank_b_scale (R, 1, r)."""
    a, b = power_iteration(residual, rank, iters, seed)
    parts = {}
    for name, f in (("lowrank_a", a), ("lowrank_b", b[:, None])):
        if dtype == "int8":
            f, f_scale = quantize_factor(f)
            parts[f"{name}_scale"] = f_scale.reshape(f.shape[0], 1, -1)
        parts[name] = f.to(torch.float16 if dtype == "fp16" else torch.int8).contiguous()
    return parts


def product(a: torch.Tensor, b: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """a (..., T, r), b (..., S, D, r), segment (T,) long: the B of each token -> A B^T (..., T, D) fp32.

    One rank at a time, by elementwise products and sums: each entry is then computed the same
    way whatever the shape around it (a matmul may block and round differently by shape), so a
    row reconstructs bitwise alike alone and inside a batch, on every path that uses this.
    """
    out = None
    for k in range(a.shape[-1]):
        term = a[..., :, None, k].float() * b[..., k].float().index_select(-2, segment)
        out = term if out is None else out + term
    return out
