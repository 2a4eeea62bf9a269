"""Method kivi: groupwise asymmetric min-max quantization only (X ~ D)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BITS, CodecParams, GearConfigError, register

BACKBONES = ("kivi", "kcvt", "flexgen")
# kcvt groups keys over the whole chunk and values over the whole vector (chunk.grouping):
# its groups have no size to set
WHOLE_GROUPS = ("kcvt",)
GROUP_SIZE = 64  # of the other backbones, unless set
ROTATIONS = ("none", "hadamard")


@register("kivi")
@dataclass(frozen=True)
class KiviParams(CodecParams):
    """bits: code width of keys and values, unless key_bits / value_bits say otherwise
    (None: bits; after construction they hold the width used).
    backbone: how quantization groups are formed (kivi, kcvt, flexgen; chunk.grouping).
    group_size: tokens (per-channel groups) or channels (per-token groups) a group (None:
    64; after construction the size used, and None for kcvt, whose groups are whole).
    rotation: hadamard rotates every K and V vector by a seeded randomized Walsh-Hadamard
    matrix before it is compressed (gear_kernels.rotation; attention is unchanged); none.
    sink_tokens: each row's first prompt tokens kept exact, outside the codes (attention sinks:
    most heads attend to the first tokens heavily, so their error weighs on every query).
    """

    bits: int = 2
    backbone: str = "kivi"
    group_size: int | None = None
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
        if self.backbone in WHOLE_GROUPS:
            if self.group_size is not None:
                sized = " or ".join(b for b in BACKBONES if b not in WHOLE_GROUPS)
                raise GearConfigError(
                    f"GearConfig.group_size={self.group_size!r} is invalid (method {self.name!r}): backbone "
                    f"{self.backbone!r} groups keys over the whole chunk and values over the whole vector, so it "
                    f"takes no group_size; drop it, or use backbone {sized}"
                )
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", GROUP_SIZE)  # frozen: set once, here
            self.check_int("group_size", 1)
        self.check_int("sink_tokens", 0)

    def bits_for(self, kind: str) -> int:
        """Code width of kind 'key' or 'value'."""
        return self.key_bits if kind == "key" else self.value_bits
