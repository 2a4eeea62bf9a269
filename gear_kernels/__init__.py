"""GEAR compression of KV chunks: torch reference and Triton kernels. No transformers, no lm_eval."""

from .chunk import CompressedChunk, bits_per_element, compress, decompress
from .config import GearConfig, GearConfigError

__all__ = ["CompressedChunk", "GearConfig", "GearConfigError", "bits_per_element", "compress", "decompress"]
