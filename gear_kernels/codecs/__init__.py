"""The registry of compression methods: one file per codec, each registering itself by name.

    CODECS["gear"]        the parameters class of method gear (codecs/gear.py)
    METHODS               every registered name, in order

A new method is a new file here, imported below; everything that lists methods (GearConfig,
the cache, gear-hf's --model_args, the tests) reads them from CODECS.
"""

from . import none, kivi, gear_l, gear  # noqa: F401  (registers them, in this order)
from .base import BITS, CODECS, CodecParams, GearConfigError, register

METHODS: tuple[str, ...] = tuple(CODECS)

__all__ = ["BITS", "CODECS", "METHODS", "CodecParams", "GearConfigError", "register"]
