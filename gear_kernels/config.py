"""GearConfig: the one frozen description of how a KV cache is compressed.

Validated once, on construction; everything downstream trusts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

METHODS = ("none", "kivi", "gear-l", "gear")
BITS = (2, 3, 4, 8)
BACKBONES = ("kivi", "kcvt", "flexgen")
KERNELS = ("auto", "triton", "torch")


class GearConfigError(ValueError):
    """A GearConfig field has a value outside what is allowed."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise GearConfigError(f"GearConfig.{field}={value!r} is invalid: allowed {allowed}")


def _check_int(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, value, f"an integer >= {low}")


@dataclass(frozen=True)
class GearConfig:
    """How to compress a KV cache (DESIGN.md section 2; paper semantics are the defaults).

    method: none (exact), kivi (quantization only), gear-l (+ low-rank), gear (+ outliers).
    backbone: how quantization groups are formed (kivi, kcvt, flexgen).
    outlier_ratio: fraction s of a chunk's entries kept exactly (s/2 largest, s/2 smallest).
    rank_prompt / rank_chunk: low-rank rank for the prompt and for each streamed chunk.
    buffer_size: generated tokens kept exact before they are compressed as one chunk.
    kernel: auto (triton on CUDA, torch elsewhere), triton or torch.
    """

    method: str = "gear"
    bits: int = 2
    backbone: str = "kivi"
    group_size: int = 64
    outlier_ratio: float = 0.02
    rank_prompt: int = 4
    rank_chunk: int = 2
    power_iters: int = 3
    buffer_size: int = 64
    seed: int = 0
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {', '.join(METHODS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in BITS:
            _fail("bits", self.bits, f"one of {', '.join(map(str, BITS))}")
        if self.backbone not in BACKBONES:
            _fail("backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        if self.kernel not in KERNELS:
            _fail("kernel", self.kernel, f"one of {', '.join(KERNELS)}")
        _check_int("group_size", self.group_size, 1)
        _check_int("rank_prompt", self.rank_prompt, 0)
        _check_int("rank_chunk", self.rank_chunk, 0)
        _check_int("power_iters", self.power_iters, 1)
        _check_int("buffer_size", self.buffer_size, 1)
        _check_int("seed", self.seed, 0)
        ratio = self.outlier_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            _fail("outlier_ratio", ratio, "a number in [0, 1)")

    @property
    def uses_outliers(self) -> bool:
        return self.method == "gear" and self.outlier_ratio > 0

    @property
    def uses_lowrank(self) -> bool:
        return self.method in ("gear", "gear-l")

    @property
    def compresses(self) -> bool:
        return self.method != "none"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "GearConfig":
        """Build from loosely typed options (strings from a command line, or numbers).

        Unknown keys and unparsable values raise GearConfigError naming the key.
        """
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in known:
                raise GearConfigError(
                    f"unknown GEAR option {key!r}: valid options are {', '.join(known)}"
                )
            kwargs[key] = _coerce(key, raw, known[key])
        return cls(**kwargs)


def _coerce(key: str, raw: Any, type_name: str) -> Any:
    """A command-line value -> the field's type. lm-eval hands numbers over already parsed, and
    reads `2.0` or ` 2` as the float 2.0: an integral float is the integer it names."""
    if type_name == "int" and isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if type_name == "int":
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if type_name == "float":
            return float(text)
    except ValueError:
        _fail(key, raw, f"a value of type {type_name}")
    return text.lower()
