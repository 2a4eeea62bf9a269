"""``--model_args`` of ``gear-hf``: which keys are GEAR options, and their validation.

Kept apart from ``model.py`` so that lm-eval's command line can check the options before it
indexes tasks or loads anything (see ``registration.patch_cli_config``).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import re
from functools import lru_cache
from typing import Any

from gear_kernels import GearConfig, GearConfigError

GEAR_OPTIONS: tuple[str, ...] = GearConfig.field_names()
# gear-hf's options that are not compression settings: fidelity=true also runs the exact model
# on every request and reports the distance (lm_eval_gear.paired)
RUN_OPTIONS: tuple[str, ...] = ("fidelity",)
OPTIONS = GEAR_OPTIONS + RUN_OPTIONS

# What other KV-cache tools call these options (transformers' QuantizedCacheConfig, KIVI, the
# GEAR reference code); a user coming from one of them types these.
PEER_NAMES: dict[str, tuple[str, ...]] = {
    "nbits": ("bits",), "quant_bits": ("bits",), "quantize_bit": ("bits",), "kv_bits": ("bits",),
    "k_bits": ("key_bits",), "v_bits": ("value_bits",),
    "q_group_size": ("group_size",), "residual_length": ("buffer_size",), "streaming_gap": ("buffer_size",),
    "rank": ("rank_prompt", "rank_chunk"), "left": ("outlier_ratio",), "loop": ("power_iters",),
}
# Words of GEAR option names that no HFLM, from_pretrained or common model-config argument is
# made of: a key holding one of them (or a same-length typo of one) is a GEAR option misspelt.
GEAR_WORDS = ("method", "bits", "outlier", "rank", "lowrank", "buffer")


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
    rest = {k: v for k, v in args.items() if k not in OPTIONS}
    for key in rest:
        if key in hflm_arg_names():
            continue
        guesses = gear_option_guesses(key)
        if guesses or key.lower().startswith("gear"):
            hint = f" (did you mean {' or '.join(map(repr, guesses))}?)" if guesses else ""
            raise GearConfigError(
                f"gear-hf: unknown --model_args option {key!r}{hint}; "
                f"the GEAR options are {', '.join(OPTIONS)}"
            )
    try:
        config = GearConfig.from_options(gear)
    except GearConfigError as exc:
        raise GearConfigError(f"gear-hf: invalid --model_args: {exc}") from None
    if config.kernel == "triton" and config.compresses and not _triton_runs_here(rest.get("device")):
        raise GearConfigError(
            "gear-hf: invalid --model_args: GearConfig.kernel='triton' needs a CUDA device (or "
            "TRITON_INTERPRET=1, Triton's CPU interpreter): allowed here auto, torch"
        )
    return config, rest


def _triton_runs_here(device: Any) -> bool:
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return True
    import torch

    return torch.cuda.is_available() and not str(device or "").startswith("cpu")


def gear_option_guesses(key: str) -> tuple[str, ...]:
    """The GEAR options `key` looks like a misspelling of (several when it is ambiguous), or ()."""
    lowered = key.lower()
    if lowered.startswith("gear_") and lowered[5:] in GEAR_OPTIONS:
        return (lowered[5:],)
    if lowered in PEER_NAMES:
        return PEER_NAMES[lowered]
    near = difflib.get_close_matches(lowered, OPTIONS, n=2, cutoff=0.75)
    if near:
        return tuple(near)
    if len(lowered) >= 4:  # a shortened name: group, buffer, outlier, rank_p...
        starts = tuple(o for o in GEAR_OPTIONS if o.startswith(lowered))
        if starts:
            return starts
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w]
    return tuple(
        option for option in GEAR_OPTIONS
        if any(_typo_of(w, part) for w in words for part in option.split("_") if part in GEAR_WORDS)
    )


def _typo_of(word: str, target: str) -> bool:
    """word is target, or target with one letter changed or two neighbours swapped."""
    if len(word) != len(target):
        return False
    diff = [i for i, (a, b) in enumerate(zip(word, target)) if a != b]
    if len(diff) <= 1:
        return True
    i, j = diff[0], diff[-1]
    return len(diff) == 2 and j == i + 1 and word[i] == target[j] and word[j] == target[i]


def fidelity_option(args: dict[str, Any]) -> bool:
    """The value of ``fidelity`` (default false): a bool, as lm-eval parses ``true``/``false``."""
    raw = args.get("fidelity", False)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        raw = raw.strip().lower() == "true"
    if isinstance(raw, int) and raw in (0, 1):  # bool included
        return bool(raw)
    raise GearConfigError(f"gear-hf: invalid --model_args: fidelity={raw!r} is invalid: allowed true or false")


def check_model_args(args: dict[str, Any] | None) -> GearConfig:
    """Everything about ``--model_args`` that can be checked without loading the model."""
    args = dict(args or {})
    config, rest = split_model_args(args)
    fidelity_option(args)
    if args.get("pretrained") is None:
        if rest.get("gguf_file"):
            raise GearConfigError("gear-hf: gguf_file needs pretrained=<folder or hub id>")
        from .smollm2 import smollm2_dir

        smollm2_dir()  # the embedded default must be installed
    return config


def response_cache_tag(config: GearConfig, pretrained: Any) -> str:
    """The suffix gear-hf gives lm-eval's --use_cache path: a digest of the GEAR config and the model.

    lm-eval keys a cached response by its request alone, so two configurations (or models) that
    shared a file would read each other's answers.
    """
    key = {"gear": config.as_dict(), "pretrained": None if pretrained is None else str(pretrained)}
    return "_gear-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
