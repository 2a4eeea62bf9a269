"""The few places where transformers 5.x releases (and their models) differ for us."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The name a model's forward and generate take the cache under.

    transformers renamed `past_key_values` to `cache` during 5.x; the old name still works in
    newer releases but warns on every call.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_kwargs(model) -> dict:
    """The forward argument that computes the logits of the last position only, where the model
    takes it (`logits_to_keep`, as generate() uses it); else nothing, and all are computed."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
