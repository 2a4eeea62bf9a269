"""Method gear: quantization, low rank, and sparse outliers kept aside (X ~ D + L + S)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import fail, register
from .gear_l import GearLParams

OUTLIER_DTYPES = ("model", "fp16")


@register("gear")
@dataclass(frozen=True)
class GearParams(GearLParams):
    """outlier_ratio: fraction s of a chunk's entries kept aside (s/2 largest, s/2 smallest).
    outlier_dtype: their values in the model's dtype (exact), or in fp16 (2 bytes whatever the
    model; a value beyond fp16's range is refused, never made inf).
    """

    outlier_ratio: float = 0.02
    outlier_dtype: str = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.outlier_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0 \
                or math.isnan(ratio):
            fail("outlier_ratio", ratio, "a number in [0, 1)", self.name)
        self.check_choice("outlier_dtype", OUTLIER_DTYPES)

    @property
    def uses_outliers(self) -> bool:
        return self.outlier_ratio > 0
