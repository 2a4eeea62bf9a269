"""What generating each prompt alone (gear-hf under compression) buys and costs, against batched
generation.

    python -m benchmarks.batch_invariance --questions 16 --batch-size 8 --tokens 64

On SmolLM2-135M and the GEAR paper's 8-shot GSM8K prompts (~850 tokens), through generate_until
(greedy, --tokens new tokens), per run: how many generations at batch size --batch-size are the
same text as at batch size 1, and the wall and CPU time at each batch size. gear-hf generates
each prompt alone through a cache of its own; "batched" is one left-padded generate() a batch
through one GEAR cache (what gear-hf did before), where the model rounds a row's keys and values
otherwise than alone and 2-bit codes turn those ulps into steps. `--model hf` (exact cache,
batched) beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from unittest import mock

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from benchmarks.smollm2 import DEFAULT_DATA_DIR, gsm8k_prompts, load_smollm2
from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.model import GearHFLM

CONFIGS = {
    "kivi-2": dict(method="kivi", bits=2),
    "gear-2": dict(method="gear", bits=2),
    # issue 17's case: small groups and buffer, so that generated tokens fill many chunks
    "kivi-2-g8b4": dict(method="kivi", bits=2, group_size=8, buffer_size=4, rotation="hadamard", sink_tokens=2),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _batched(lm, context, max_length, stop, **generation_kwargs):
    """A batch's prompts through one GEAR cache in one generate() (the comparison)."""
    generation_kwargs[cache_kwarg(lm.model)] = lm.make_cache(generation_kwargs.get("attention_mask"))
    return HFLM._model_generate(lm, context, max_length, stop, **generation_kwargs)


def generations(lm, prompts: list[str], tokens: int, batch_size: int) -> tuple[list[str], float, float]:
    """(texts, wall s, CPU s) of greedy generate_until at batch_size."""
    kwargs = {"until": ["\nQuestion:"], "max_gen_toks": tokens, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    lm.batch_size_per_gpu = batch_size
    wall, cpu = time.perf_counter(), _cpu()
    texts = lm.generate_until(requests, disable_tqdm=True)
    return texts, time.perf_counter() - wall, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens a generation")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from " + ", ".join(CONFIGS))
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    prompts = gsm8k_prompts(DEFAULT_DATA_DIR, args.questions)
    n = args.batch_size
    print(f"SmolLM2-135M fp32, {args.questions} GSM8K 8-shot prompts, {args.tokens} greedy tokens\n")
    print(f"| run | same text at batch {n} as at 1 | wall at 1 (s) | wall at {n} (s) | CPU at 1 (s) | CPU at {n} (s) |")
    print("|---|---|---|---|---|---|", flush=True)
    runs = [("hf (exact cache, batched)", None, False)]
    for name in args.configs.split(","):
        runs += [(f"{name}, each prompt alone (gear-hf)", name, False), (f"{name}, batched", name, True)]
    for label, name, batched in runs:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu") if name is None else \
            GearHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", **CONFIGS[name])
        patch = mock.patch.object(GearHFLM, "_model_generate", _batched) if batched else contextlib.nullcontext()
        with patch:
            one, wall_1, cpu_1 = generations(lm, prompts, args.tokens, 1)
            many, wall_n, cpu_n = generations(lm, prompts, args.tokens, n)
        same = sum(a == b for a, b in zip(one, many, strict=True))
        print(f"| {label} | {same}/{len(prompts)} | {wall_1:.0f} | {wall_n:.0f} | {cpu_1:.0f} | {cpu_n:.0f} |", flush=True)


if __name__ == "__main__":
    main()
