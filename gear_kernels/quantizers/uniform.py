"""Uniform groupwise quantizers: asymmetric min-max codes with an fp16 scale and zero a group.

Three layouts of the groups (the backbones of the GEAR paper, DESIGN.md section 2):

    kivi      keys per channel, in groups of G consecutive tokens; values per token, G channels a group
    kcvt      keys per channel over the whole chunk; values per token over the whole vector
    flexgen   keys and values per token, in groups of G channels

Stored: `codes` (a token's head_dim codes packed into W bytes, packing.py) and `scale`, `zero`:
per token (R, T, n_groups) when groups run along channels, per token group (R, ceil(T / G), D)
when they run along tokens. The arithmetic is quantize.py's; the Triton encode is
triton_quantize.py's, which stores the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packing import CODES_PER_WORD, pack, packed_length, unpack
from ..quantize import dequantize_entries, quantize
from .base import Field, Quantizer, register


@dataclass(frozen=True)
class Uniform(Quantizer):
    """bits: code width. per_channel: groups along tokens (one channel each), else along
    channels (one token each). group: entries a group (0: the whole chunk's tokens, kcvt keys)."""

    bits: int
    per_channel: bool
    group: int

    allowed_bits = (2, 3, 4, 8)
    grouped = True  # takes a group_size
    rotation = "none"  # unless the codec asks for one

    @classmethod
    def from_codec(cls, codec, kind: str) -> "Uniform":
        per_channel = kind == "key" and cls.name != "flexgen"
        group = codec.group_size or 0  # kcvt: whole groups, sized by the chunk
        return cls(bits=codec.bits_for(kind), per_channel=per_channel, group=group)

    @property
    def fields(self) -> tuple[Field, ...]:
        axis = "group" if self.per_channel else "token"
        return Field("codes", "codes", "token"), Field("scale", "scales", axis), Field("zero", "scales", axis)

    def token_group(self, tokens: int) -> int:
        return (self.group or tokens) if self.per_channel else 0

    def channel_group(self, head_dim: int) -> int:
        return head_dim if self.per_channel else (self.group or head_dim)

    def encode(self, x: torch.Tensor, exclude: torch.Tensor | None, kernel: str = "torch") -> dict[str, torch.Tensor]:
        """x (R, T, D) fp32 -> codes (R, T, W) uint8, scale and zero fp16: (R, ceil(T / G), D) per
        channel, else (R, T, ceil(D / G)). kernel 'triton': the same bytes by triton_quantize."""
        rows, tokens, head_dim = x.shape
        group = self.token_group(tokens) or self.channel_group(head_dim)
        if kernel == "triton":
            from ..triton_quantize import quantize_pack

            codes, scale, zero = quantize_pack(x, exclude, self.bits, group, self.per_channel)
        else:
            grouped = x.float().transpose(-1, -2) if self.per_channel else x.float()  # groups along the last axis
            skip = None if exclude is None else (exclude.transpose(-1, -2) if self.per_channel else exclude)
            codes, scale, zero = quantize(grouped, skip, self.bits, group)
            codes = pack(codes.transpose(-1, -2) if self.per_channel else codes, self.bits)
        if self.per_channel:  # (R, D, n_groups) -> items along the token axis
            scale, zero = scale.transpose(-1, -2).contiguous(), zero.transpose(-1, -2).contiguous()
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
        """codes (..., T, W), scale and zero (..., T, D) per channel or (..., T, n_groups)."""
        codes = unpack(parts["codes"], self.bits, head_dim)
        scale, zero = parts["scale"], parts["zero"]
        if not self.per_channel:
            group = self.channel_group(head_dim)
            scale = scale.repeat_interleave(group, dim=-1)[..., :head_dim]
            zero = zero.repeat_interleave(group, dim=-1)[..., :head_dim]
        return dequantize_entries(codes, scale, zero)

    def triton_spec(self, head_dim: int, groups: torch.Tensor, tokens: torch.Tensor, block_n: int) -> dict:
        """What the decode kernel needs to call dequant_tile / dequant_entries on this
        quantizer's segments (groups, tokens: (S,) of each segment)."""
        pw = CODES_PER_WORD[self.bits]
        group = self.channel_group(head_dim)
        if self.bits == 3 or head_dim % pw or (not self.per_channel and group % pw):
            mode = 0
        elif self.per_channel and bool(((groups % block_n == 0) | (groups >= tokens)).all()):
            mode = 2  # every tile lies in one token group
        else:
            mode = 1
        gw = head_dim if self.per_channel else -(-head_dim // group)
        return dict(tile=dequant_tile, entry=dequant_entries, BITS=self.bits, PW=pw, LAYOUT=self.per_channel,
                    MODE=mode, W=packed_length(head_dim, self.bits), GW=gw, CG=group, consts=None)


@register
class Kivi(Uniform):
    name = "kivi"


@register
class Kcvt(Uniform):
    name = "kcvt"
    grouped = False  # keys over the whole chunk, values over the whole vector


@register
class Flexgen(Uniform):
    name = "flexgen"


# ---------------------------------------------------------------- Triton: a decode tile's codes, dequantized
try:
    import triton
    import triton.language as tl
except ImportError:  # gear_kernels works without triton: torch paths only
    triton = None

if triton is not None:

    @triton.jit
    def code_at(codes, tok, d, mask, W, BITS: tl.constexpr, PW: tl.constexpr):
        """The codes of entries (tok, d) (broadcastable index tensors), int32, W bytes a token
        packed as packing.py packs them."""
        if BITS == 3:  # 8 codes in a 3-byte word; a code may straddle two bytes
            bit = (d % 8) * 3
            byte = tok * W + (d // 8) * 3 + bit // 8
            shift = bit % 8
            lo = tl.load(codes + byte, mask=mask, other=0).to(tl.int32)
            hi = tl.load(codes + byte + 1, mask=mask & (shift > 5), other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> shift) & 7
        else:
            byte = tl.load(codes + tok * W + d // PW, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((d % PW) * BITS)) & ((1 << BITS) - 1)
        return code

    @triton.jit
    def dequant_entries(codes, scale, zero, tok, d, mask, W, GW, G,
                        BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr):
        """Entries (tok, d) of one segment (broadcastable index tensors), fp32: codes W bytes a
        token; scale/zero rows of GW entries, one a token group of G tokens (PER_CHANNEL, GW = D)
        or one a token with groups of G channels."""
        code = code_at(codes, tok, d, mask, W, BITS, PW)
        if PER_CHANNEL:
            g = (tok // G) * GW + d
        else:
            g = tok * GW + d // G
        s = tl.load(scale + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero + g, mask=mask, other=0.0).to(tl.float32)
        return code.to(tl.float32) * s + z

    @triton.jit
    def dequant_tile(codes, scale, zero, t0, t_end, D, W, GW, G,
                     BITS: tl.constexpr, PW: tl.constexpr, PER_CHANNEL: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_N: tl.constexpr, D_P: tl.constexpr):
        """Tokens [t0, t0 + BLOCK_N) (those < t_end) of one segment: (BLOCK_N, D_P) fp32.

        MODE 0: every entry gathers its own bytes, scale and zero (any layout, 3-bit included).
        MODE 1: whole bytes are loaded, (BLOCK_N, D / PW), and split into their PW codes in
        registers; scale and zero once a byte (per-token groups, G a multiple of PW) or once an
        entry. MODE 2: as 1, and the tile lies in one token group: scale and zero one (D,) row.
        """
        tok = t0 + tl.arange(0, BLOCK_N)
        t_ok = tok < t_end
        d = tl.arange(0, D_P)
        ok = t_ok[:, None] & (d < D)[None, :]
        if MODE == 0:
            out = dequant_entries(codes, scale, zero, tok[:, None], d[None, :], ok, W, GW, G, BITS, PW, PER_CHANNEL)
        else:
            WD: tl.constexpr = D_P // PW
            w = tl.arange(0, WD)
            j = tl.arange(0, PW)
            w_ok = t_ok[:, None] & (w < W)[None, :]
            words = tl.load(codes + tok[:, None] * W + w[None, :], mask=w_ok, other=0).to(tl.int32)
            code = (words[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)
            code = tl.reshape(code, (BLOCK_N, D_P)).to(tl.float32)  # entry d = byte * PW + j
            if PER_CHANNEL:
                if MODE == 2:
                    g = (t0 // G) * GW + d
                    sc = tl.load(scale + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
                    ze = tl.load(zero + g, mask=d < D, other=0.0).to(tl.float32)[None, :]
                else:
                    g = (tok[:, None] // G) * GW + d[None, :]
                    sc = tl.load(scale + g, mask=ok, other=0.0).to(tl.float32)
                    ze = tl.load(zero + g, mask=ok, other=0.0).to(tl.float32)
            else:
                g = tok[:, None] * GW + (w * PW)[None, :] // G  # a byte never straddles two groups
                sc = tl.load(scale + g, mask=w_ok, other=0.0).to(tl.float32)
                ze = tl.load(zero + g, mask=w_ok, other=0.0).to(tl.float32)
                sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
                ze = tl.reshape(tl.broadcast_to(ze[:, :, None], (BLOCK_N, WD, PW)), (BLOCK_N, D_P))
            out = code * sc + ze
        return out
