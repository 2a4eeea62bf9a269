"""TurboQuant, the project's and fused-turboquant's, at one bit width over rotation seeds.

    python -m benchmarks.turboquant_seeds --bits 3 --seeds 0,1,2,3 --peer-seeds 42,0,1,2

On the frontier's prompts and protocol (benchmarks/frontier.py: the paper's GSM8K 8-shot
prompts, teacher-forced along the exact model's greedy continuation, SmolLM2-135M), the mean
KL of `method=kivi,backbone=turboquant` with each `seed` (the seed of its Hadamard signs) and
of fused-turboquant's TurboQuantMSE with each of its seeds (the frontier's peer uses 42). The
frontier compares one seed of each; this says how much of a difference is the rotation drawn.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import frontier
from benchmarks.turboquant_cache import turboquant_cache
from lm_eval_gear.fidelity import agreement, exact_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2,3", help="the project's rotation seeds")
    parser.add_argument("--peer-seeds", default="42,0,1,2", help="fused-turboquant's seeds")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    peer_seeds = [int(s) for s in args.peer_seeds.split(",")]
    model, tokenizer = frontier.load_model(None)
    prompts = frontier.task_prompts("gsm8k", frontier.DEFAULT_DATA_DIR, 0, args.questions)
    kl = {("project", s): [] for s in seeds} | {("fused-turboquant", s): [] for s in peer_seeds}
    peer = f"turboquant-{args.bits}"
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        continuation, _ = exact_run(model, ids, args.tokens)
        kv, first = frontier.prefill(model, ids)
        exact, _ = frontier.forced(model, "exact", kv, first, continuation)
        for who, seed in kl:
            if who == "project":
                entry, cache = {"method": "kivi", "backbone": "turboquant", "bits": args.bits, "seed": seed}, None
            else:
                entry, cache = peer, turboquant_cache(model.config, args.bits, frontier.BUFFER, seed=seed)
            logits, _ = frontier.forced(model, entry, kv, first, continuation, cache=cache)
            kl[who, seed].append(agreement(exact, logits)["kl"])
    print(f"\n| turboquant {args.bits}-bit | seed | KL ({len(prompts)} prompts) |\n|---|---:|---:|")
    for (who, seed), values in kl.items():
        print(f"| {who} | {seed} | {statistics.mean(values):.4f} |")
    for who in ("project", "fused-turboquant"):
        print(f"mean over seeds, {who}: {statistics.mean(statistics.mean(v) for (w, _), v in kl.items() if w == who):.4f}")


if __name__ == "__main__":
    main()
