"""What a quantizer is: the tensors it stores, its torch encode/decode, registered by name.

A quantizer turns a chunk's vectors into stored tensors and back; GEAR's corrections (low rank,
outliers: gear_kernels/corrections) compose with any of them. Every stored tensor, of a
quantizer or a correction, is described by a Field, and everything that moves stored tensors
(the chunk, the store: concatenation, row selection, dropping, byte counts, rebuilding, the
decode kernel's pointers) reads the fields tables instead of naming tensors.

Layout: in a chunk of R rows (batch rows x kv heads, flattened) a field is (R, items, *inner);
in the store, where the segments of every row lie back to back, (H, items, *inner). Its items
run along `axis`:

    token    one item per token                      (codes, per-token scales, low-rank A)
    group    one item per `token_group` tokens       (per-channel scales: keys grouped along tokens)
    segment  one item per chunk                      (low-rank B, factor scales)
    list     a count per chunk, the encoder's choice (outlier values and indices)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

AXES = ("token", "group", "segment", "list")
COMPONENTS = ("codes", "scales", "outliers", "lowrank", "exact")  # how stored bytes are reported (exact: method none)


@dataclass(frozen=True)
class Field:
    name: str
    component: str
    axis: str

    def __post_init__(self) -> None:
        assert self.component in COMPONENTS and self.axis in AXES, self


@dataclass(frozen=True)
class Quantizer:
    """A quantizer's settings for one kind ('key' or 'value'): built by the codec, frozen.

    Subclasses say what they store (`fields`) and implement encode / decode; `token_group` says
    how many tokens an item of a 'group' field covers (0: the quantizer has none).
    """

    name: ClassVar[str] = ""
    allowed_bits: ClassVar[tuple[int, ...]] = ()  # code widths it takes
    grouped: ClassVar[bool] = False  # whether it takes a group_size
    rotation: ClassVar[str] = "none"  # the rotation a codec applies unless told otherwise
    bits: int

    @classmethod
    def from_codec(cls, codec, kind: str) -> "Quantizer":
        """This quantizer as a codec's parameters (codecs/) configure it for kind 'key' or 'value'."""
        return cls(bits=codec.bits_for(kind))

    @property
    def fields(self) -> tuple[Field, ...]:
        raise NotImplementedError

    def token_group(self, tokens: int) -> int:
        return 0

    def encode(self, x: torch.Tensor, exclude: torch.Tensor | None, kernel: str = "torch") -> dict[str, torch.Tensor]:
        """x (R, T, D) in the model dtype -> {field name: (R, items, *inner)}. exclude (R, T, D)
        bool or None: entries the caller keeps elsewhere (outliers): they must not shape the
        others' codes. kernel: 'triton' where the quantizer has a Triton encode (same bytes)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
        """Token-aligned parts {name: (..., T, *inner)} (a group or segment item repeated over
        its tokens) -> (..., T, head_dim) fp32. Elementwise per token, so a token decodes alike
        whatever surrounds it (batch invariance)."""
        raise NotImplementedError

    def triton_spec(self, head_dim: int, groups: torch.Tensor, tokens: torch.Tensor, block_n: int) -> dict:
        """How the decode kernel (triton_attention.py) reads this quantizer's segments (groups,
        tokens: (S,) of each): {"tile": a @triton.jit function (f0, f1, f2, t0, t_end, D, W, GW,
        G, BITS, PW, LAYOUT, MODE, BLOCK_N, D_P) -> the (BLOCK_N, D_P) fp32 tile of tokens
        [t0, t0 + BLOCK_N) < t_end, f0..f2 pointing at the segment's first entry of each of its
        fields (or at `consts`); "entry": the same for entries (f0, f1, f2, tok, d, mask, W, GW,
        G, BITS, PW, LAYOUT) (the outliers' approximation); the ints W, GW, CG and constexprs
        BITS, PW, LAYOUT, MODE it wants; "consts": a tensor it reads beside its fields, or None}.
        Each must equal `decode` bit for bit."""
        raise NotImplementedError


QUANTIZERS: dict[str, type[Quantizer]] = {}  # name -> class, in registration order


def register(cls: type[Quantizer]) -> type[Quantizer]:
    assert cls.name and cls.name not in QUANTIZERS, f"quantizer {cls.name!r} unnamed or registered twice"
    QUANTIZERS[cls.name] = cls
    return cls
