"""Method gear-l: quantization plus a low-rank approximation of its residual (X ~ D + L)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .kivi import KiviParams

LOWRANK_DTYPES = ("fp16", "int8")


@register("gear-l")
@dataclass(frozen=True)
class GearLParams(KiviParams):
    """rank_prompt / rank_chunk: rank of the compressed prompt / of each streamed chunk.
    power_iters: power-iteration steps (seeded by GearConfig.seed).
    lowrank_dtype: fp16 factors, or int8 with one fp16 scale per column of each factor.
    """

    rank_prompt: int = 4
    rank_chunk: int = 2
    power_iters: int = 3
    lowrank_dtype: str = "fp16"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("rank_prompt", 0)
        self.check_int("rank_chunk", 0)
        self.check_int("power_iters", 1)
        self.check_choice("lowrank_dtype", LOWRANK_DTYPES)

    @property
    def uses_lowrank(self) -> bool:
        return True

    def rank(self, prompt: bool) -> int:
        return self.rank_prompt if prompt else self.rank_chunk
