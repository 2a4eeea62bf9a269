"""Low-rank approximation of the quantization residual by seeded power iteration."""

from __future__ import annotations

import math

import torch

from .quantize import round_fp16


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
