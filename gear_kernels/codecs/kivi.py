"""Method kivi: groupwise asymmetric min-max quantization only (X ~ D)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BITS, CodecParams, register

BACKBONES = ("kivi", "kcvt", "flexgen")
ROTATIONS = ("none", "hadamard")


@register("kivi")
@dataclass(frozen=True)
class KiviParams(CodecParams):
    """bits: code width of keys and values, unless key_bits / value_bits say otherwise
    (None: bits; after construction they hold the width used).
    backbone: how quantization groups are formed (kivi, kcvt, flexgen; chunk.grouping).
    group_size: tokens (per-channel groups) or channels (per-token groups) a group.
    rotation: hadamard rotates every K and V vector by a seeded randomized Walsh-Hadamard
    matrix before it is compressed (gear_kernels.rotation; attention is unchanged); none.
    sink_tokens: each row's first prompt tokens kept exact, outside the codes (attention sinks:
    most heads attend to the first tokens heavily, so their error weighs on every query).
    """

    bits: int = 2
    backbone: str = "kivi"
    group_size: int = 64
    key_bits: int | None = None
    value_bits: int | None = None
    rotation: str = "none"
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("bits", BITS)
        for field in ("key_bits", "value_bits"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, self.bits)  # frozen: set once, here
            self.check_choice(field, BITS)
        self.check_choice("backbone", BACKBONES)
        self.check_choice("rotation", ROTATIONS)
        self.check_int("group_size", 1)
        self.check_int("sink_tokens", 0)

    def bits_for(self, kind: str) -> int:
        """Code width of kind 'key' or 'value'."""
        return self.key_bits if kind == "key" else self.value_bits
