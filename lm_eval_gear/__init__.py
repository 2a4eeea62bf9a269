"""lm-eval-gear: GEAR-compressed KV caches for transformers models and the `gear-hf` lm-eval backend."""

# The exports load torch and transformers, so they are imported on first use (PEP 562): the
# `lm-eval-gear` command (lm_eval_gear.cli) needs neither and starts in a fraction of a second.
_EXPORTS = {"GearCache": ".cache", "GearConfig": "gear_kernels", "use_gear_attention": ".attention"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
