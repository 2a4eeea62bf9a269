"""GEAR compression of KV chunks: torch reference and Triton kernels. No transformers, no lm_eval.

compress and decode_attention run the path config.kernel (or kernel=) picks: see dispatch.py.
"""

from .chunk import CompressedChunk, bits_per_element, decompress
from .config import GearConfig, GearConfigError
from .dispatch import compress, decode_attention, resolve_kernel

__all__ = [
    "CompressedChunk", "GearConfig", "GearConfigError", "bits_per_element", "compress", "decode_attention",
    "decompress", "resolve_kernel",
]
