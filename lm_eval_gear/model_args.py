"""``--model_args`` of ``gear-hf``: which keys are GEAR options, and their validation.

Kept apart from ``model.py`` so that lm-eval's command line can check the options before it
indexes tasks or loads anything (see ``registration.patch_cli_config``).
"""

from __future__ import annotations

import difflib
import inspect
from functools import lru_cache
from typing import Any

from gear_kernels import GearConfig, GearConfigError

GEAR_OPTIONS: tuple[str, ...] = GearConfig.field_names()


@lru_cache(maxsize=1)
def hflm_arg_names() -> frozenset[str]:
    """The named parameters of lm-eval's HFLM (everything ``--model hf`` takes by name)."""
    from lm_eval.models.huggingface import HFLM

    params = inspect.signature(HFLM.__init__).parameters
    return frozenset(n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD)


def split_model_args(args: dict[str, Any]) -> tuple[GearConfig, dict[str, Any]]:
    """Split ``--model_args`` into a validated GearConfig and the arguments meant for HFLM.

    Keys named like a GearConfig field are GEAR options; values may be strings (as typed on a
    command line) or numbers. Other keys go to HFLM, which hands the ones it does not know to
    ``from_pretrained`` (as ``--model hf`` does), except keys that look like a misspelt GEAR
    option (``bit=2``, ``gear_bits=2``): those are refused. Raises :class:`GearConfigError`
    naming the key or value and the valid choices.
    """
    gear = {k: v for k, v in args.items() if k in GEAR_OPTIONS}
    rest = {k: v for k, v in args.items() if k not in GEAR_OPTIONS}
    unknown = [k for k in rest if k not in hflm_arg_names()]
    for key in unknown:
        near = _near_gear_option(key)
        if near or key.lower().startswith("gear"):
            hint = f" (did you mean {near!r}?)" if near else ""
            raise GearConfigError(
                f"gear-hf: unknown --model_args option {key!r}{hint}; "
                f"the GEAR options are {', '.join(GEAR_OPTIONS)}"
            )
    try:
        config = GearConfig.from_options(gear)
    except GearConfigError as exc:
        raise GearConfigError(f"gear-hf: invalid --model_args: {exc}") from None
    if config.kernel == "triton" and config.compresses:
        import torch

        if not torch.cuda.is_available() or str(rest.get("device") or "").startswith("cpu"):
            raise GearConfigError(
                "gear-hf: invalid --model_args: GearConfig.kernel='triton' needs a CUDA device: "
                "allowed here auto, torch"
            )
    return config, rest


def _near_gear_option(key: str) -> str | None:
    """The GEAR option a key looks like a misspelling of (``bit``, ``buffer``, ``gear_bits``), if any."""
    lowered = key.lower()
    if lowered.startswith("gear_") and lowered[5:] in GEAR_OPTIONS:
        return lowered[5:]
    near = difflib.get_close_matches(lowered, GEAR_OPTIONS, n=1, cutoff=0.75)
    if near:
        return near[0]
    if len(lowered) >= 4:  # a shortened name: group, buffer, outlier, rank_p...
        starts = [o for o in GEAR_OPTIONS if o.startswith(lowered)]
        if len(starts) == 1:
            return starts[0]
    return None


def check_model_args(args: dict[str, Any] | None) -> GearConfig:
    """Everything about ``--model_args`` that can be checked without loading the model."""
    args = dict(args or {})
    config, rest = split_model_args(args)
    if args.get("pretrained") is None:
        if rest.get("gguf_file"):
            raise GearConfigError("gear-hf: gguf_file needs pretrained=<folder or hub id>")
        from .smollm2 import smollm2_dir

        smollm2_dir()  # the embedded default must be installed
    return config
