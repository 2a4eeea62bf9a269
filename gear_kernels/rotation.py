"""A seeded randomized Walsh-Hadamard rotation of each K/V vector (option rotation=hadamard).

R = diag(signs) H / sqrt(d), with H the d x d Walsh-Hadamard matrix and seeded random signs,
is orthogonal: rotating keys and values before quantization spreads a vector's outlying
channels over all of them (what TurboQuant and QuaRot do), and attention is unchanged when the
query is rotated alike and the output rotated back:

    softmax(q R (K R)^T) (V R) R^T = softmax(q K^T) V    (R R^T = I)

head_dim must be a power of two. A KVStore that holds its K/V rotated carries the signs
(store.py: to_basis / from_basis), so every reader of it is in the model's basis.
"""

from __future__ import annotations

import torch


def rotation_of(config) -> str:
    """A GearConfig's rotation; codecs that quantize nothing (none) have no such option."""
    return getattr(config.codec, "rotation", "none")


def check_head_dim(head_dim: int) -> None:
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"rotation=hadamard needs a power-of-two head_dim, this model has {head_dim}: "
                         "use rotation=none")


def hadamard_signs(head_dim: int, seed: int) -> torch.Tensor:
    """(head_dim,) fp32 of +-1, the same for a seed on every device."""
    check_head_dim(head_dim)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=generator).float() * 2 - 1


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) fp32 -> x H / sqrt(d), by log2(d) butterflies (H symmetric, so also H x)."""
    d = x.shape[-1]
    out = x
    step = 1
    while step < d:
        pairs = out.reshape(*x.shape[:-1], d // (2 * step), 2, step)
        out = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], dim=-2)
        step *= 2
    return out.reshape(x.shape) / d**0.5


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> x R = (x * signs) H / sqrt(d), computed in fp32, returned in x's dtype."""
    assert x.shape[-1] == signs.shape[-1], f"head_dim {x.shape[-1]} != rotation size {signs.shape[-1]}"
    return _walsh_hadamard(x.float() * signs.to(x.device)).to(x.dtype)


def unrotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> x R^T = (x H / sqrt(d)) * signs, the inverse of rotate."""
    assert x.shape[-1] == signs.shape[-1], f"head_dim {x.shape[-1]} != rotation size {signs.shape[-1]}"
    return (_walsh_hadamard(x.float()) * signs.to(x.device)).to(x.dtype)
