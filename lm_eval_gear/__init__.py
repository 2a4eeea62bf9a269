"""lm-eval-gear: GEAR-compressed KV caches for transformers models and the `gear-hf` lm-eval backend."""

from gear_kernels import GearConfig

from .attention import use_gear_attention
from .cache import GearCache

__all__ = ["GearCache", "GearConfig", "use_gear_attention"]
