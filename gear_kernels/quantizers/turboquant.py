"""TurboQuant's MSE quantizer (arXiv 2504.19874): one norm a vector, a fixed codebook a coordinate.

Each K or V vector x (head_dim D, already rotated by the seeded randomized Hadamard rotation,
gear_kernels/rotation.py) is stored as its norm ||x|| (fp16) and, for every coordinate of the
unit vector x / ||x||, the b-bit index of its nearest centroid in a Lloyd-Max codebook. After a
random rotation every coordinate of a unit vector follows the same known law, the density of
one coordinate of a uniformly random unit vector in R^D,

    f(t) ~ (1 - t^2)^((D - 3) / 2) on [-1, 1]        (about N(0, 1/D) for large D),

so one codebook per (bits, D), computed once, serves every vector: nothing per group is stored
but the norm (16 bits a vector, 0.25 bits an element at D = 64).

Choices:
- the norm is rounded to the nearest fp16, and the codes are chosen against the grid decode
  really reads, codebook * fp16(norm): each entry's code is its nearest point of that grid, so
  rounding the norm costs the direction nothing. A norm beyond fp16 (or NaN/Inf) is refused.
- decode is codebook[code] * norm, one fp32 multiply an entry, so that the Triton tile
  (`dequant_tile`) reproduces it bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..packing import CODES_PER_WORD, pack, packed_length, unpack
from .base import Field, Quantizer, register

GRID = 1 << 20  # points of the grid on [0, 1] that stands for the density in Lloyd-Max
MAX_ITERS = 20_000  # Lloyd-Max stops earlier, as soon as no cell boundary moves on the grid


@functools.lru_cache(maxsize=None)
def codebook(bits: int, head_dim: int) -> torch.Tensor:
    """(2^bits,) fp32 centroids, ascending and symmetric, in units of a unit vector's coordinate.

    Lloyd-Max on the exact density, represented by GRID cell midpoints of [0, 1] (float64): the
    density is even, so the optimal codebook is symmetric and only the positive half is solved
    (cells [0, e_1], ..., [e_{k-1}, 1], the cut at 0 fixed), which makes it exactly symmetric.
    Prefix sums of the weights give every cell's mass and mean in O(1), so an iteration costs
    one search of the edges in the grid; the iteration ends when the cells stop changing
    (a fixed point: each centroid is its cell's mean, each edge the midpoint of its centroids).
    """
    assert bits >= 1 and head_dim >= 2, (bits, head_dim)
    t = (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID  # (GRID,) midpoints; avoids t = 1
    weight = torch.exp((head_dim - 3) / 2 * torch.log1p(-t * t))  # (GRID,) unnormalised density
    zero = torch.zeros(1, dtype=torch.float64)
    mass = torch.cat([zero, weight.cumsum(0)])  # (GRID + 1,) prefix sums
    moment = torch.cat([zero, (weight * t).cumsum(0)])
    half = 1 << (bits - 1)
    # start: cells of equal mass
    cut = torch.searchsorted(mass, (torch.arange(half + 1, dtype=torch.float64) / half) * mass[-1])
    cut[0], cut[-1] = 0, GRID
    for _ in range(MAX_ITERS):
        centroids = (moment[cut[1:]] - moment[cut[:-1]]) / (mass[cut[1:]] - mass[cut[:-1]])  # (half,)
        edges = torch.searchsorted(t, (centroids[1:] + centroids[:-1]) / 2)  # (half - 1,)
        new_cut = torch.cat([cut[:1], edges, cut[-1:]])
        if torch.equal(new_cut, cut):
            break
        cut = new_cut
    return torch.cat([-centroids.flip(0), centroids]).float()


def midpoints(book: torch.Tensor) -> torch.Tensor:
    """(L,) codebook -> (L - 1,) decision boundaries: a value codes to its nearest centroid."""
    return (book[1:] + book[:-1]) / 2


def fp16_norm(norm: torch.Tensor) -> torch.Tensor:
    """(..., 1) fp32 norms -> fp16, rounded to nearest; refuses what fp16 cannot hold, since an
    infinite norm would decode to Inf or NaN and poison attention."""
    rounded = norm.half()
    if not torch.isfinite(rounded).all():
        worst = norm[~torch.isfinite(rounded)].flatten()[0].item()
        raise ValueError(
            f"turboquant stores each key/value vector's norm in fp16, but a vector here has norm {worst:.6g} "
            f"(fp16 holds at most {torch.finfo(torch.float16).max:.0f}, and no NaN or Inf): this model's cache "
            "cannot be stored this way; use method=none (or a min-max quantizer such as kivi)"
        )
    return rounded


@register
@dataclass(frozen=True)
class TurboQuant(Quantizer):
    """bits (2, 3 or 4) a coordinate plus an fp16 norm a vector; keys and values alike."""

    bits: int

    name = "turboquant"
    fields = (Field("codes", "codes", "token"), Field("norm", "scales", "token"))
    allowed_bits = (2, 3, 4)
    grouped = False
    rotation = "hadamard"  # the codebook is the law of a rotated vector's coordinates

    def __post_init__(self) -> None:
        assert self.bits in (2, 3, 4), f"turboquant bits must be 2, 3 or 4, got {self.bits}"

    def encode(self, x: torch.Tensor, exclude: torch.Tensor | None, kernel: str = "torch") -> dict[str, torch.Tensor]:
        """x (R, T, D) -> codes (R, T, W) uint8, norm (R, T, 1) fp16. Excluded entries are zeroed
        first, so neither the norm nor the other codes see them. One path (no Triton encode)."""
        x = x.float()
        if exclude is not None:
            x = x.masked_fill(exclude, 0.0)
        norm = fp16_norm(torch.linalg.vector_norm(x, dim=-1, keepdim=True))  # (R, T, 1)
        # x against codebook * norm: divide once; a zero norm (zero vector) divides by `tiny`
        unit = x / norm.float().clamp_min(torch.finfo(torch.float32).tiny)  # (R, T, D)
        book = codebook(self.bits, x.shape[-1]).to(x.device)
        codes = torch.bucketize(unit, midpoints(book), out_int32=True)  # (R, T, D) in [0, 2^bits)
        return {"codes": pack(codes, self.bits), "norm": norm}

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
        """codes (..., T, W), norm (..., T, 1) -> (..., T, head_dim) fp32: codebook[code] * norm."""
        codes = unpack(parts["codes"], self.bits, head_dim).long()  # (..., T, D)
        book = codebook(self.bits, head_dim).to(codes.device)
        return book[codes] * parts["norm"].float()

    def triton_spec(self, head_dim: int, groups: torch.Tensor, tokens: torch.Tensor, block_n: int) -> dict:
        """What the decode kernel needs to call tile / entry (see uniform.Uniform.triton_spec)."""
        return dict(tile=tile, entry=entry, BITS=self.bits, PW=CODES_PER_WORD[self.bits], LAYOUT=False, MODE=0,
                    W=packed_length(head_dim, self.bits), GW=1, CG=1, consts=codebook(self.bits, head_dim))


try:  # gear_kernels works without triton: the tile exists where triton imports
    import triton
    import triton.language as tl
except ImportError:
    pass
else:
    from .uniform import code_at

    @triton.jit
    def dequant_tile(codes_rows, norm_rows, book_ptr, ok, D, W,
                     BITS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr):
        """A (BLOCK_N, D_P) fp32 tile of decoded tokens, `decode` bit for bit.

        codes_rows / norm_rows (BLOCK_N,): pointers to each token's W code bytes and fp16 norm;
        ok (BLOCK_N,): the tokens to read (others, and channels d >= D, give 0); book_ptr: the
        2^BITS fp32 codebook. Plain fp32 arithmetic (bf16 is wrong in the interpreter).
        """
        d = tl.arange(0, D_P)
        take = ok[:, None] & (d < D)[None, :]  # (BLOCK_N, D_P)
        if BITS == 3:  # 8 codes in a 3-byte word: a code may straddle two bytes; gather per entry
            bit = (d % 8) * 3
            byte = (d // 8) * 3 + bit // 8  # (D_P,)
            shift = (bit % 8)[None, :]
            lo = tl.load(codes_rows[:, None] + byte[None, :], mask=take, other=0).to(tl.int32)
            hi = tl.load(codes_rows[:, None] + byte[None, :] + 1, mask=take & (shift > 5), other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> shift) & 7
        else:  # whole bytes (BLOCK_N, D_P / PW), split into their PW codes in registers
            PW: tl.constexpr = 8 // BITS
            w = tl.arange(0, D_P // PW)
            j = tl.arange(0, PW)
            byte = tl.load(codes_rows[:, None] + w[None, :], mask=ok[:, None] & (w < W)[None, :], other=0)
            code = (byte.to(tl.int32)[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)
            code = tl.reshape(code, (BLOCK_N, D_P))  # entry d = byte * PW + j
        value = tl.load(book_ptr + code, mask=take, other=0.0)  # (BLOCK_N, D_P) fp32
        norm = tl.load(norm_rows, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        return value * norm[:, None]

    @triton.jit
    def tile(codes, norm, book, t0, t_end, D, W, GW, G, BITS: tl.constexpr, PW: tl.constexpr,
             LAYOUT: tl.constexpr, MODE: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr):
        """The decode kernel's call (quantizers/uniform.py's dequant_tile signature): tokens
        [t0, t0 + BLOCK_N) of a segment (those < t_end); GW, G, LAYOUT, MODE unused."""
        tok = t0 + tl.arange(0, BLOCK_N)
        return dequant_tile(codes + tok * W, norm + tok, book, tok < t_end, D, W, BITS, BLOCK_N, D_P)

    @triton.jit
    def entry(codes, norm, book, tok, d, mask, W, GW, G, BITS: tl.constexpr, PW: tl.constexpr, LAYOUT: tl.constexpr):
        """Entries (tok, d) (broadcastable index tensors), fp32: the outliers' approximation."""
        code = code_at(codes, tok, d, mask, W, BITS, PW)
        value = tl.load(book + code, mask=mask, other=0.0)
        return value * tl.load(norm + tok, mask=mask, other=0.0).to(tl.float32)
