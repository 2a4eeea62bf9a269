"""Method kivi: groupwise asymmetric min-max quantization only (X ~ D)."""

from __future__ import annotations

from dataclasses import dataclass

from ..quantizers import QUANTIZERS
from .base import BITS, CodecParams, GearConfigError, register

BACKBONES = tuple(QUANTIZERS)  # the quantizer, by name (gear_kernels/quantizers)
GROUP_SIZE = 64  # of the backbones that take a group size, unless set
ROTATIONS = ("none", "hadamard")


@register("kivi")
@dataclass(frozen=True)
class KiviParams(CodecParams):
    """bits: code width of keys and values, unless key_bits / value_bits say otherwise
    (None: bits; after construction they hold the width used).
    backbone: the quantizer (gear_kernels/quantizers: kivi, kcvt, flexgen group layouts of
    uniform codes; turboquant, a codebook and one norm a vector).
    group_size: tokens (per-channel groups) or channels (per-token groups) a group (None:
    64; after construction the size used, and None for backbones without sized groups).
    rotation: hadamard rotates every K and V vector by a seeded randomized Walsh-Hadamard
    matrix before it is compressed (gear_kernels.rotation; attention is unchanged); none.
    None: the backbone's own choice (hadamard for turboquant, none for the others).
    sink_tokens: each row's first prompt tokens kept exact, outside the codes (attention sinks:
    most heads attend to the first tokens heavily, so their error weighs on every query).
    """

    bits: int = 2
    backbone: str = "kivi"
    group_size: int | None = None
    key_bits: int | None = None
    value_bits: int | None = None
    rotation: str | None = None
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("bits", BITS)
        for field in ("key_bits", "value_bits"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, self.bits)  # frozen: set once, here
            self.check_choice(field, BITS)
        self.check_choice("backbone", BACKBONES)
        quantizer = QUANTIZERS[self.backbone]
        for field in ("key_bits", "value_bits"):
            self.check_choice(field, quantizer.allowed_bits)
        if self.rotation is None:
            object.__setattr__(self, "rotation", quantizer.rotation)  # frozen: set once, here
        self.check_choice("rotation", ROTATIONS)
        if not quantizer.grouped:
            if self.group_size is not None:
                sized = " or ".join(b for b in BACKBONES if QUANTIZERS[b].grouped)
                raise GearConfigError(
                    f"GearConfig.group_size={self.group_size!r} is invalid (method {self.name!r}): backbone "
                    f"{self.backbone!r} has no groups to size, so it takes no group_size; drop it, or use "
                    f"backbone {sized}"
                )
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", GROUP_SIZE)  # frozen: set once, here
            self.check_int("group_size", 1)
        self.check_int("sink_tokens", 0)

    def bits_for(self, kind: str) -> int:
        """Code width of kind 'key' or 'value'."""
        return self.key_bits if kind == "key" else self.value_bits
