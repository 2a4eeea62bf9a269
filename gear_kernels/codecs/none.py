"""Method none: the cache is kept exact (bit-identical to transformers' DynamicCache)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CodecParams, register


@register("none")
@dataclass(frozen=True)
class NoneParams(CodecParams):
    """No parameters: nothing is compressed."""

    @property
    def compresses(self) -> bool:
        return False
