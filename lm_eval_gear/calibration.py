"""budget=B: the most faithful config that stores at most B bits a K/V element, on this model.

Which config is the most faithful at a given number of stored bits depends on the model (a
rotation that helps SmolLM2 hurts a model with other outlier channels), so gear-hf can choose it
at start: every candidate (a small grid over the levers of benchmarks/frontier.py: the
quantizer, code widths for keys and values, group size, rotation, one attention sink) compresses
the same exact prompt keys and values and is teacher-forced along the exact model's greedy
continuation; the pick is the candidate with the lowest mean KL(exact || cache) among those that
stored no more than B bits on every prompt (every candidate is measured on the first prompt, the
KEEP most faithful of them on the others). The prompts ship with the package: the paper's 8-shot
GSM8K prompt for two test questions (the last two: the frontier sweeps the first) and one long
needle-in-a-haystack prompt (RULER's "repeat" haystack, built here, no download). The cost is
one prefill and one greedy continuation a prompt, then one compression and one short forward a
candidate measured on it: at most len(candidates) + 2 * KEEP of those; `calibrate` reports its
seconds.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from gear_kernels import GearConfig, compress
from gear_kernels.quantizers import QUANTIZERS

from .compat import cache_kwarg
from .fidelity import agreement, exact_run
from .forcing import buffer_pieces

SLACK = 0.05  # bits a candidate may store beyond the budget (a partial group on a short prompt)
TOKENS = 32  # forced tokens a prompt
KEEP = 6  # candidates measured beyond the first prompt: its lowest-KL ones
LONG_PROMPT_TOKENS = 2048
BACKBONES = ("kivi", "turboquant")  # the quantizers tried: uniform codes in KIVI's layout, TurboQuant's codebook
GROUP_SIZES = (64, 80, 128)  # of a backbone that takes groups
HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "One of the special magic numbers for {key} is: {value}. "
QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} is")


@dataclass(frozen=True)
class Calibration:
    """What budget=B chose: its options (GearConfig.from_options), its mean KL, top-1 and stored
    bits (the most on one prompt) over the calibration prompts, and what choosing cost."""

    budget: float
    options: dict
    kl: float
    top1: float
    stored_bits: float
    candidates: int
    prompts: int
    seconds: float

    def as_dict(self) -> dict:
        return {"budget": self.budget, "options": self.options, "kl": self.kl, "top1": self.top1,
                "stored_bits": self.stored_bits, "candidates": self.candidates, "prompts": self.prompts,
                "seconds": round(self.seconds, 1)}


def estimated_bits(options: dict, head_dim: int) -> float:
    """A config's stored bits a K/V element before it is measured on the model: what its codec
    stores for a block of random keys and values (a whole number of every grid group; sinks left
    out), so any quantizer's table of stored tensors counts as it is."""
    block = torch.randn(1, 1, math.lcm(*GROUP_SIZES), head_dim, generator=torch.Generator().manual_seed(0))
    config = GearConfig.from_options(options)
    return 8 * sum(compress(block, config, kind).nbytes() for kind in ("key", "value")) / (2 * block.numel())


def grid(rotation: bool = True) -> list[dict]:
    """Every config calibration may try: kivi's uniform codes (groups of 64, 80 or 128), with and
    without the Hadamard rotation, and TurboQuant's codebook (no groups), rotated as its design
    needs; keys of 2, 3 or 4 bits and values as wide or narrower; with no sink or one.
    rotation=False (the model's head_dim is not a power of two): unrotated configs only."""
    splits = [(k, v) for k in (2, 3, 4) for v in (2, 3, 4) if k >= v]
    out = []
    for backbone in BACKBONES:
        quantizer = QUANTIZERS[backbone]
        rotations = ("none", "hadamard") if quantizer.rotation == "none" else (quantizer.rotation,)
        rotations = [r for r in rotations if rotation or r == "none"]
        codes = {} if backbone == "kivi" else {"backbone": backbone}
        for (key_bits, value_bits), group, rotated, sinks in itertools.product(
                splits, GROUP_SIZES if quantizer.grouped else (None,), rotations, (0, 1)):
            grouped = {} if group is None else {"group_size": group}
            out.append({"method": "kivi", **codes, "key_bits": key_bits, "value_bits": value_bits, **grouped,
                        "rotation": rotated, "sink_tokens": sinks})
    return out


def candidates(budget: float, head_dim: int, rotation: bool = True) -> list[dict]:
    """The configs of the grid estimated to store at most the budget and within a bit of it (the
    best use of a budget spends most of it)."""
    return [o for o in grid(rotation) if budget - 1 <= estimated_bits(o, head_dim) <= budget]


def calibration_prompts(tokenizer, longest: int) -> list[torch.Tensor]:
    """(1, P) token ids of each calibration prompt: two GSM8K 8-shot prompts, one long haystack;
    a prompt beyond `longest` tokens (a model's context, less the forced tokens) keeps its end."""
    from lm_eval_gear.tasks.gear_cot import gsm8k_prompt, load_gsm8k

    docs = load_gsm8k()["test"]
    texts = [gsm8k_prompt(docs[len(docs) - 1 - i]) for i in range(2)]
    prompts = [tokenizer(t, return_tensors="pt").input_ids for t in texts] + [haystack_prompt(tokenizer)]
    return [ids[:, -longest:] for ids in prompts]


def haystack_prompt(tokenizer, tokens: int = LONG_PROMPT_TOKENS) -> torch.Tensor:
    """(1, about `tokens`) ids: a repeated haystack with one needle in its middle, then the question."""
    needle = NEEDLE.format(key="quiet-harbor", value=7150342)
    question = QUESTION.format(key="quiet-harbor")
    filler = len(tokenizer(HAYSTACK).input_ids)
    half = HAYSTACK * max(1, (tokens - 64) // (2 * filler))
    return tokenizer(half + needle + half + question, return_tensors="pt").input_ids


@torch.no_grad()
def forced_logits(model, cache, kv: list[tuple[torch.Tensor, torch.Tensor]], first_logits: torch.Tensor,
                  continuation: torch.Tensor, buffer_size: int) -> torch.Tensor:
    """The cache's next-token logits (n, vocab) along continuation (1, n): the prompt's exact keys
    and values `kv` handed to it as a prefill hands them over (compressed then), the continuation
    fed in pieces that end where its buffer flushes, so each token sees what it would see in
    generation; first_logits (1, vocab) are the prefill's."""
    for i, (keys, values) in enumerate(kv):
        cache.update(keys, values, i)
    start = kv[0][0].shape[-2]
    stop = start + continuation.shape[1] - 1
    steps = [first_logits] + [
        model(continuation[:, a - start : b - start], use_cache=True, **{cache_kwarg(model): cache}).logits[0].float()
        for a, b in buffer_pieces(start, stop, start, buffer_size)]
    return torch.cat(steps)


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """ids (1, P) -> each layer's exact (keys, values) and the next-token logits (1, vocab)."""
    cache = DynamicCache(config=model.config)
    logits = model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
    return [(layer.keys, layer.values) for layer in cache.layers], logits.float()


def compressed_bits(cache) -> float:
    """Stored bits a K/V element of a GearCache's compressed part (its exact buffer left out)."""
    report = cache.memory_report()
    buffer_bytes = report["bytes"]["buffer"]
    dtype_bytes = report["dense_bytes"] // report["elements"]
    return 8 * (report["total_bytes"] - buffer_bytes) / (report["elements"] - buffer_bytes // dtype_bytes)


def calibrate(model, tokenizer, budget: float, shared: dict, rotation: bool = True) -> Calibration:
    """The lowest-KL candidate of `candidates(budget, ...)` storing at most budget + SLACK bits on
    every calibration prompt; shared: the options every candidate keeps (buffer_size, seed, kernel)."""
    from .cache import GearCache, model_head_dim

    began = time.perf_counter()
    head_dim = model_head_dim(model.config)
    tried = [{**options, **shared} for options in candidates(budget, head_dim, rotation)]
    if not tried:
        least = min(estimated_bits(o, head_dim) for o in grid(rotation))
        raise ValueError(f"budget={budget}: no candidate stores so few bits on this model (head_dim {head_dim}); "
                         f"give budget >= {math.ceil(least * 100) / 100:.2f}")
    measured = {i: [] for i in range(len(tried))}
    mean = lambda i, key: sum(r[key] for r in measured[i]) / len(measured[i])  # noqa: E731
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
    prompts = calibration_prompts(tokenizer, context - TOKENS - 1)
    alive = list(measured)
    buffer_size = GearConfig.from_options(tried[0]).buffer_size  # a shared option: every candidate's
    for n, ids in enumerate(prompts):
        continuation, _ = exact_run(model, ids, TOKENS)
        kv, first = prefill(model, ids)
        exact = forced_logits(model, DynamicCache(config=model.config), kv, first, continuation, buffer_size)
        for i in alive:
            cache = GearCache(GearConfig.from_options(tried[i]), model.config)
            logits = forced_logits(model, cache, kv, first, continuation, buffer_size)
            measured[i].append({**agreement(exact, logits), "bits": compressed_bits(cache)})
        alive = [i for i in alive if max(r["bits"] for r in measured[i]) <= budget + SLACK]
        if n == 0:  # the rest of the prompts measure the most faithful few (successive halving)
            alive = sorted(alive, key=lambda i: mean(i, "kl"))[:KEEP]
        if not alive:
            raise ValueError(f"budget={budget}: every candidate stored more than {budget + SLACK:.2f} bits on a "
                             "calibration prompt; give a larger budget")
    best = min(alive, key=lambda i: mean(i, "kl"))
    options = {k: v for k, v in tried[best].items() if k not in shared}
    return Calibration(budget, options, mean(best, "kl"), mean(best, "top1"), max(r["bits"] for r in measured[best]),
                       len(tried), len(prompts), time.perf_counter() - began)
