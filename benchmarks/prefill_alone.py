"""What prefilling each prompt alone costs generation, and what batch invariance it buys.

    python -m benchmarks.prefill_alone --questions 16 --batch-size 8 --tokens 64

On SmolLM2-135M and the GEAR paper's 8-shot GSM8K prompts (~850 tokens), through gear-hf's
generate_until (greedy, --tokens new tokens):

1. the prefill of each batch: its prompts in one left-padded forward (what HFLM does, and gear-hf
   did before) against each prompt alone (what gear-hf does under compression), wall and CPU time;
2. per config, how many generations at batch size --batch-size are the same text as at batch size
   1, with the prompts prefilled alone and (the old way, for comparison) in one padded forward;
   `--model hf` (HFLM, exact cache) beside them. Generated tokens are computed for the whole batch
   at once either way, whose matrix products round a row otherwise than alone.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from unittest import mock

import torch
from lm_eval.api.instance import Instance

from benchmarks.smollm2 import DEFAULT_DATA_DIR, gsm8k_prompts, load_smollm2
from lm_eval_gear import model as gear_model
from lm_eval_gear.compat import cache_kwarg, last_logits_kwargs
from lm_eval_gear.prefill import prefill_alone

CONFIGS = {"kivi-2": dict(method="kivi", bits=2), "gear-2": dict(method="gear", bits=2)}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


@torch.no_grad()
def prefill_costs(model, tokenizer, prompts: list[str], batch_size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of prefilling `prompts` in padded batches, then each alone."""
    from transformers import DynamicCache

    tokenizer.padding_side = "left"
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def padded():
        for batch in batches:
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
            model(**enc, position_ids=positions, use_cache=True, **{cache_kwarg(model): DynamicCache()},
                  **last_logits_kwargs(model))

    def alone():
        for prompt in prompts:
            prefill_alone(model, tokenizer(prompt).input_ids)

    return _timed(padded), _timed(alone)


def generations(lm, prompts: list[str], tokens: int, batch_size: int) -> list[str]:
    kwargs = {"until": ["\nQuestion:"], "max_gen_toks": tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    lm.batch_size_per_gpu = batch_size
    return lm.generate_until(requests, disable_tqdm=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens a generation")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_smollm2()
    prompts = gsm8k_prompts(DEFAULT_DATA_DIR, args.questions)
    (pad_wall, pad_cpu), (alone_wall, alone_cpu) = prefill_costs(model, tokenizer, prompts, args.batch_size)
    print(f"SmolLM2-135M fp32, {args.questions} GSM8K 8-shot prompts, batches of {args.batch_size}\n")
    print("| prefill | wall (s) | CPU (s) |\n|---|---|---|")
    print(f"| one padded forward a batch | {pad_wall:.1f} | {pad_cpu:.1f} |")
    print(f"| each prompt alone | {alone_wall:.1f} ({alone_wall / pad_wall:.2f}x) | {alone_cpu:.1f} ({alone_cpu / pad_cpu:.2f}x) |")
    print(f"\n| run ({args.tokens} greedy tokens) | same text at batch {args.batch_size} as at 1 | "
          f"wall at batch {args.batch_size} (s) |\n|---|---|---|", flush=True)
    runs = [("hf (exact cache)", None, False)]
    for name in args.configs.split(","):
        runs += [(f"{name}, prompts prefilled alone", CONFIGS[name], False),
                 (f"{name}, one padded prefill (before)", CONFIGS[name], True)]
    for name, options, before in runs:
        padded = mock.patch.object(gear_model, "prompts_prefilled_alone", lambda *_: contextlib.nullcontext())
        with padded if before else contextlib.nullcontext():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu") if options is None else \
                gear_model.GearHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", **options)
            alone = generations(lm, prompts, args.tokens, 1)
            start = time.perf_counter()
            batched = generations(lm, prompts, args.tokens, args.batch_size)
            wall = time.perf_counter() - start
        same = sum(a == b for a, b in zip(alone, batched, strict=True))
        print(f"| {name} | {same}/{len(prompts)} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
