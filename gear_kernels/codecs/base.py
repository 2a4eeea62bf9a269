"""What every codec shares: the error type, value checks, the parameter base class, the registry.

A codec is one compression method: a frozen dataclass of its own parameters (one file each,
registered here by name) that checks them on construction. GearConfig names the codec
(`method`) and holds it beside the settings every codec shares (buffer_size, seed, kernel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

BITS = (2, 3, 4, 8)
CODECS: dict[str, type["CodecParams"]] = {}  # method name -> its parameters, in registration order


class GearConfigError(ValueError):
    """A GEAR option has a value outside what is allowed, or is not one the method uses."""


def fail(field: str, value: Any, allowed: str, method: str | None = None) -> None:
    where = "" if method is None else f" (method {method!r})"
    raise GearConfigError(f"GearConfig.{field}={value!r} is invalid{where}: allowed {allowed}")


def check_int(field: str, value: Any, low: int, method: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(field, value, f"an integer >= {low}", method)


def check_choice(field: str, value: Any, choices: tuple, method: str | None = None) -> None:
    # bool and float are refused even where they compare equal to a choice (True == 1, 2.0 == 2)
    if type(value) not in {type(c) for c in choices} or value not in choices:
        fail(field, value, f"one of {', '.join(map(str, choices))}", method)


@dataclass(frozen=True)
class CodecParams:
    """A codec's parameters. Subclasses add fields and check them in __post_init__ (calling
    super().__post_init__() first), and say what they store through the properties below."""

    name = ""  # set by register()

    def __post_init__(self) -> None:
        pass

    def check_int(self, field: str, low: int) -> None:
        check_int(field, getattr(self, field), low, self.name)

    def check_choice(self, field: str, choices: tuple) -> None:
        check_choice(field, getattr(self, field), choices, self.name)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def option_types(cls) -> dict[str, str]:
        """option -> its annotation, as written ('int', 'float', 'str', 'int | None')."""
        return {f.name: str(f.type) for f in dataclasses.fields(cls)}

    @property
    def compresses(self) -> bool:
        return True

    @property
    def uses_outliers(self) -> bool:
        return False

    @property
    def uses_lowrank(self) -> bool:
        return False

    def rank(self, prompt: bool) -> int:
        """Low-rank rank of the prompt (prompt=True) or of a streamed chunk; 0: none stored."""
        return 0


def register(name: str) -> Callable[[type[CodecParams]], type[CodecParams]]:
    """Class decorator: the codec `name`, found by GearConfig(method=name)."""

    def add(cls: type[CodecParams]) -> type[CodecParams]:
        assert name not in CODECS, f"codec {name!r} registered twice"
        cls.name = name
        CODECS[name] = cls
        return cls

    return add
