"""The few places where transformers 5.x releases differ for us."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The name a model's forward and generate take the cache under.

    transformers renamed `past_key_values` to `cache` during 5.x; the old name still works in
    newer releases but warns on every call.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
