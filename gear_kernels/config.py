"""GearConfig: the one frozen description of how a KV cache is compressed.

It names the codec (`method`, one of codecs.METHODS) and holds the codec's own parameters
(`codec`, validated by the codec itself) beside the settings every codec shares. Validated once,
on construction; everything downstream trusts it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .codecs import CODECS, METHODS, CodecParams, GearConfigError
from .codecs.base import check_choice, check_int, fail

KERNELS = ("auto", "triton", "torch")
SHARED = {"buffer_size": "int", "seed": "int", "kernel": "str"}  # options of every method, and their types

__all__ = ["GearConfig", "GearConfigError", "KERNELS", "METHODS"]


@dataclass(frozen=True, init=False)
class GearConfig:
    """How to compress a KV cache (DESIGN.md section 2; paper semantics are the defaults).

    GearConfig(method="gear", bits=2, ...): the method's own options (codecs/<method>.py) go to
    its parameters, `codec`; an option the method does not use is refused (GearConfigError).
    Read them there (config.codec.bits): a method's options are its codec's fields, and
    getattr(config.codec, "rotation", "none") is how code reads one that some method lacks.
    buffer_size: generated tokens kept exact before they are compressed as one chunk.
    seed: start of every seeded computation (the power iteration).
    kernel: auto (triton on CUDA, torch elsewhere), triton or torch.
    """

    method: str
    codec: CodecParams
    buffer_size: int
    seed: int
    kernel: str

    def __init__(self, method: str = "gear", *, buffer_size: int = 64, seed: int = 0, kernel: str = "auto",
                 **options: Any) -> None:
        check_choice("method", method, METHODS)
        check_choice("kernel", kernel, KERNELS)
        check_int("buffer_size", buffer_size, 1)
        check_int("seed", seed, 0)
        params = CODECS[method]
        unused = [key for key in options if key not in params.options()]
        if unused:
            if unused[0] not in option_types():
                raise GearConfigError(
                    f"unknown GEAR option {unused[0]!r}: valid options are {', '.join(self.field_names())}"
                )
            takes = ", ".join([*params.options(), *SHARED])
            raise GearConfigError(f"method {method!r} does not use {unused[0]}; it takes {takes}")
        for name, value in (("method", method), ("codec", params(**options)), ("buffer_size", buffer_size),
                            ("seed", seed), ("kernel", kernel)):
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def uses_outliers(self) -> bool:
        return self.codec.uses_outliers

    @property
    def uses_lowrank(self) -> bool:
        return self.codec.uses_lowrank

    @property
    def compresses(self) -> bool:
        return self.codec.compresses

    def rank(self, prompt: bool) -> int:
        """Low-rank rank of the prompt (prompt=True) or of each streamed chunk; 0 for none."""
        return self.codec.rank(prompt)

    def as_dict(self) -> dict[str, Any]:
        """{"method": ..., the codec's options..., the shared ones}: what from_options takes back."""
        return {"method": self.method, **asdict(self.codec), **{k: getattr(self, k) for k in SHARED}}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every option name: method, those of every codec (in registration order), the shared ones."""
        return ("method", *option_types(), *SHARED)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "GearConfig":
        """Build from loosely typed options (strings from a command line, or numbers).

        Unknown keys, options the method does not use and unparsable values raise
        GearConfigError naming the key. Only the options given are checked: defaults never are.
        """
        known = {"method": "str", **option_types(), **SHARED}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in known:
                raise GearConfigError(f"unknown GEAR option {key!r}: valid options are {', '.join(known)}")
            kwargs[key] = _coerce(key, raw, known[key])
        return cls(**kwargs)


def option_types() -> dict[str, str]:
    """Every codec option -> its type, in registration order (the codecs agree on shared names)."""
    types: dict[str, str] = {}
    for params in CODECS.values():
        types.update(params.option_types())
    return types


def _coerce(key: str, raw: Any, type_name: str) -> Any:
    """A command-line value -> the option's type. lm-eval hands numbers over already parsed, and
    reads `2.0` or ` 2` as the float 2.0: an integral float is the integer it names."""
    type_name = type_name.removesuffix(" | None")
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
        fail(key, raw, f"a value of type {type_name}")
    return text.lower()
