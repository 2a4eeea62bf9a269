"""``--model_args`` of ``gear-hf``: which keys are GEAR options, and their validation.

Kept apart from ``model.py`` so that lm-eval's command line can check the options before it
indexes tasks or loads anything (see ``registration.patch_cli_config``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
from functools import lru_cache
from typing import Any

import torch

from gear_kernels import GearConfig, GearConfigError
from gear_kernels.chunk import DTYPES
from gear_kernels.config import SHARED
from gear_kernels.rotation import check_head_dim, rotation_of

GEAR_OPTIONS: tuple[str, ...] = GearConfig.field_names()
# gear-hf's options that are not compression settings: fidelity=true also runs the exact model
# on every request and reports the distance (lm_eval_gear.paired); attention picks the path that
# reads the cache (lm_eval_gear.cache): auto is packed where the kernel is Triton, rebuilt elsewhere;
# budget=B chooses the compression settings on the model at start (lm_eval_gear.calibration)
RUN_OPTIONS: tuple[str, ...] = ("fidelity", "attention", "budget")
ATTENTION_PATHS: tuple[str, ...] = ("auto", "rebuilt", "packed")
OPTIONS = GEAR_OPTIONS + RUN_OPTIONS

# What other KV-cache tools call these options (transformers' QuantizedCacheConfig, KIVI, the
# GEAR reference code); a user coming from one of them types these.
PEER_NAMES: dict[str, tuple[str, ...]] = {
    "nbits": ("bits",), "quant_bits": ("bits",), "quantize_bit": ("bits",), "kv_bits": ("bits",),
    "k_bits": ("key_bits",), "v_bits": ("value_bits",),
    "q_group_size": ("group_size",), "residual_length": ("buffer_size",), "streaming_gap": ("buffer_size",),
    "rank": ("rank_prompt", "rank_chunk"), "left": ("outlier_ratio",), "loop": ("power_iters",),
}
# Words of GEAR option names that no HFLM, from_pretrained or model-config argument holds (checked
# against every transformers config in tests/test_model_args.py): a key holding one of them, or
# a slip of one, is a GEAR option misspelt. Other words (rank, method, buffer: kv_lora_rank,
# topk_method, offload_buffers; sink: index_num_sink_tokens) count only where a key names an
# option's words one for one, or its first words (gear_option_guesses).
GEAR_WORDS = ("bits", "outlier", "rotation")
# endings dropped before words are compared, so that rotate, rotations and rotation are one word
SUFFIXES = ("ions", "ion", "es", "s", "e")


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
    if budget_option(args) is not None:  # the method comes from the calibration: for now, its shared options
        gear = {"method": "kivi", **gear}
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
    # method none runs no kernel, but kernel=triton there is as wrong as anywhere: said, not ignored
    if config.kernel == "triton" and not _triton_runs_here(rest.get("device")):
        raise GearConfigError(
            "gear-hf: invalid --model_args: GearConfig.kernel='triton' needs a CUDA device (or "
            "TRITON_INTERPRET=1, Triton's CPU interpreter): allowed here auto, torch"
        )
    _check_dtype(config, rest.get("dtype"))
    return config, rest


def _check_dtype(config: GearConfig, dtype: Any) -> None:
    """A model dtype GEAR cannot compress (float64) would fail only at the first forward, after the load.

    Named as HFLM names it: a torch.dtype, or the name of one in torch (float32, half, double).
    """
    if not config.compresses or dtype is None or dtype == "auto":
        return
    if (getattr(torch, dtype, None) if isinstance(dtype, str) else dtype) not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise GearConfigError(
            f"gear-hf: invalid --model_args: dtype={dtype} cannot be compressed: GEAR compresses "
            f"{names} caches; use one of those, or method=none to run uncompressed"
        )


def _triton_runs_here(device: Any) -> bool:
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return True
    return torch.cuda.is_available() and not str(device or "").startswith("cpu")


def gear_option_guesses(key: str) -> tuple[str, ...]:
    """The GEAR options `key` looks like a misspelling of (several when it is ambiguous), or ().

    In this order: another tool's name for it; an option it shortens; options whose words it
    names one for one (bufer_size, gear_bits, rotate); options whose first words it names (rank,
    outlier, sinks; not token, a later word of sink_tokens and from_pretrained's own); options
    holding a word of GEAR_WORDS that it names (keep_outliers). Words match by _same_word.
    """
    lowered = key.lower()
    if lowered in PEER_NAMES:
        return PEER_NAMES[lowered]
    if len(lowered) >= 4:  # a shortened name: group, buffer, outlier, rank_p...
        starts = tuple(o for o in GEAR_OPTIONS if o.startswith(lowered))
        if starts:
            return starts
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w and w != "gear"]
    if not words:
        return ()

    def leads(option: str) -> bool:  # the key names the option's first words, in order
        parts = option.split("_")
        return len(words) <= len(parts) and all(map(_same_word, words, parts))

    one_for_one = [o for o in GEAR_OPTIONS if len(o.split("_")) == len(words) and leads(o)]
    first_words = [o for o in GEAR_OPTIONS if leads(o)]
    gear_word = [o for o in GEAR_OPTIONS
                 if any(_same_word(w, part) for w in words for part in o.split("_") if part in GEAR_WORDS)]
    return tuple(one_for_one or first_words or gear_word)


def _same_word(word: str, target: str) -> bool:
    """word is target, inflected (rotate, rotations; sinks), or target with one slip: two
    neighbours swapped, or, both of five letters or more, one letter changed, added or dropped
    (shorter words are too alike for that: bias is not bits)."""
    if _stem(word) == _stem(target):
        return True
    if len(word) == len(target):
        diff = [i for i, (a, b) in enumerate(zip(word, target)) if a != b]
        if len(diff) == 2 and diff[1] == diff[0] + 1:
            i, j = diff
            return word[i] == target[j] and word[j] == target[i]
        return len(diff) == 1 and len(word) >= 5
    short, long = sorted((word, target), key=len)
    if len(short) < 5 or len(long) != len(short) + 1:
        return False
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _stem(word: str) -> str:
    for suffix in SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def fidelity_option(args: dict[str, Any]) -> bool:
    """The value of ``fidelity`` (default false): a bool, as lm-eval parses ``true``/``false``."""
    raw = args.get("fidelity", False)
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        raw = raw.strip().lower() == "true"
    if isinstance(raw, int) and raw in (0, 1):  # bool included
        return bool(raw)
    raise GearConfigError(f"gear-hf: invalid --model_args: fidelity={raw!r} is invalid: allowed true or false")


def budget_option(args: dict[str, Any]) -> float | None:
    """The value of ``budget`` (stored bits a K/V element), or None; with it, only the options
    every method shares (buffer_size, seed, kernel) may be given: it chooses the others."""
    raw = args.get("budget")
    if raw is None:
        return None
    try:
        budget = float(raw)
    except (TypeError, ValueError):
        budget = math.nan
    if not math.isfinite(budget) or budget <= 0 or isinstance(raw, bool):
        raise GearConfigError(f"gear-hf: invalid --model_args: budget={raw!r} is invalid: allowed a number of bits "
                              "a K/V element, e.g. budget=3.0")
    chosen = [k for k in GEAR_OPTIONS if k in args and k not in SHARED]
    if chosen:
        raise GearConfigError(f"gear-hf: invalid --model_args: budget={raw} chooses the method and its options on the "
                              f"model; drop {', '.join(chosen)} (or drop budget)")
    return budget


def attention_option(args: dict[str, Any], config: GearConfig) -> str:
    """The value of ``attention`` (default auto), checked against the config's kernel."""
    path = args.get("attention", "auto")
    if path not in ATTENTION_PATHS:
        raise GearConfigError(f"gear-hf: invalid --model_args: attention={path!r} is invalid: allowed "
                              f"{', '.join(ATTENTION_PATHS)}")
    if path == "rebuilt" and config.kernel == "triton":
        raise GearConfigError("gear-hf: invalid --model_args: kernel=triton attends straight from the packed cache, "
                              "attention=rebuilt through a rebuilt copy: use kernel=auto or torch with it")
    return path


def check_model_args(args: dict[str, Any] | None) -> GearConfig:
    """Everything about ``--model_args`` that can be checked without loading the model."""
    args = dict(args or {})
    config, rest = split_model_args(args)
    fidelity_option(args)
    attention_option(args, config)
    budget_option(args)
    if args.get("pretrained") is None:
        if rest.get("gguf_file"):
            raise GearConfigError("gear-hf: gguf_file needs pretrained=<folder or hub id>")
        from .smollm2 import smollm2_dir

        smollm2_dir()  # the embedded default must be installed
    check_model_config(config, args.get("pretrained"), rest)
    return config


def check_model_config(config: GearConfig, pretrained: Any, hf_args: dict[str, Any]) -> None:
    """What the model's config rules out, told before its weights load: rotation=hadamard on a
    head_dim that is not a power of two (Phi-3's 96).

    The config is read as HFLM reads it (AutoConfig: a local folder, or a hub id from the cache or
    the hub); pretrained may also be a loaded model. A config that cannot be read here is left to
    the load, which says why. GGUF files (the embedded SmolLM2, head_dim 64, among them) are left
    to the cache's own check after the load: transformers parses the whole file for their config,
    seconds on every run for a check that rarely fails.
    """
    if rotation_of(config) != "hadamard" or pretrained is None or hf_args.get("gguf_file"):
        return
    model_config = _model_config(pretrained, hf_args)
    if model_config is None:
        return
    from .cache import model_head_dim

    try:
        check_head_dim(model_head_dim(model_config))
    except ValueError as exc:
        raise GearConfigError(f"gear-hf: invalid --model_args: {exc}") from None


def _model_config(pretrained: Any, hf_args: dict[str, Any]) -> Any:
    if not isinstance(pretrained, (str, os.PathLike)):
        return getattr(pretrained, "config", None)  # a loaded model (the Python API)
    from transformers import AutoConfig

    kwargs = {k: hf_args[k] for k in ("revision", "subfolder", "trust_remote_code") if hf_args.get(k) is not None}
    try:
        return AutoConfig.from_pretrained(str(pretrained), **kwargs)
    except (OSError, ValueError):  # not found, offline, remote code not trusted: the load says which
        return None


def response_cache_tag(config: GearConfig, pretrained: Any, args: dict[str, Any] | None = None) -> str:
    """The suffix gear-hf gives lm-eval's --use_cache path: a digest of the GEAR config, the
    model, and the run options of `args` that change answers (an attention path, a budget).

    lm-eval keys a cached response by its request alone, so two configurations (or models, or
    paths, which round apart) that shared a file would read each other's answers.
    """
    key = {"gear": config.as_dict(), "pretrained": None if pretrained is None else str(pretrained)}
    args = args or {}
    if args.get("attention", "auto") != "auto":
        key["attention"] = args["attention"]
    budget = budget_option(args)
    if budget is not None:
        key["budget"] = budget
    return "_gear-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
