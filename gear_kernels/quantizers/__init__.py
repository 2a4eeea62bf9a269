"""The registry of quantizers: one file each, registering itself by name.

    QUANTIZERS["kivi"]    the class of quantizer kivi (uniform.py)

A codec's `backbone` names its quantizer. A new quantizer is a new file here, imported below.
"""

from . import uniform, turboquant  # noqa: F401  (registers kivi, kcvt, flexgen, turboquant, in this order)
from .base import AXES, COMPONENTS, QUANTIZERS, Field, Quantizer, register

__all__ = ["AXES", "COMPONENTS", "QUANTIZERS", "Field", "Quantizer", "register"]
