"""GEAR compression of KV chunks: torch reference and Triton kernels. No transformers, no lm_eval."""

from .chunk import CompressedChunk, bits_per_element, compress, decompress
from .config import GearConfig, GearConfigError
from .dispatch import decode_attention, resolve_kernel

__all__ = [
    "CompressedChunk", "GearConfig", "GearConfigError", "bits_per_element", "compress", "decode_attention",
    "decompress", "resolve_kernel",
]
