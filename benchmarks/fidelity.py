"""Fidelity, memory and speed of compressed KV caches on SmolLM2-135M-Instruct, GSM8K 8-shot.

Every configuration runs in the same process on the same prompts, beside the exact cache and
transformers' QuantizedCache (quanto, HQQ), so the ratios are comparable:

    python -m benchmarks.fidelity --questions 20 --tokens 128 --plot benchmarks/fidelity.png

Teacher-forced (the main gauge, DESIGN.md section 5): the exact greedy continuation is fed
through each cache and every step's next-token distribution is compared with the exact one.
GearCache is fed in buffer-aligned pieces (lm_eval_gear.forcing), which shows each token the
same cache as feeding it alone would; the peers are fed one token at a time.
Free-running: each cache generates greedily on its own; tokens and final answers are compared
with the exact run's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, QuantizedCache

from gear_kernels import GearConfig
from lm_eval_gear import GearCache
from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.fidelity import agreement, exact_run, teacher_forced_logits
from lm_eval_gear.forcing import forward_with_cache
from lm_eval_gear.smollm2 import load_smollm2
from lm_eval_gear.tasks.gear_cot import gsm8k_answer, gsm8k_gold, gsm8k_prompt
from benchmarks.smollm2 import DEFAULT_DATA_DIR, gsm8k_docs

GEAR_CONFIGS = {
    "kivi-2": GearConfig(method="kivi", bits=2),
    "gear-l-2": GearConfig(method="gear-l", bits=2),
    "gear-2": GearConfig(method="gear", bits=2),
    "kivi-3": GearConfig(method="kivi", bits=3),
    "kivi-4": GearConfig(method="kivi", bits=4),
    "gear-4": GearConfig(method="gear", bits=4),
}
PEERS = {"quanto-2": ("quanto", 2), "quanto-4": ("quanto", 4), "hqq-2": ("hqq", 2), "hqq-4": ("hqq", 4)}


def make_cache(name: str, model):
    if name == "exact":
        return DynamicCache(config=model.config)
    if name in GEAR_CONFIGS:
        return GearCache(GEAR_CONFIGS[name], model.config)
    backend, bits = PEERS[name]
    # the peers' residual window and group match GEAR's buffer and group (64)
    return QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=64, residual_length=64)


def stored_bytes(obj) -> int:
    """Bytes of every tensor an object holds: plain tensors, quanto's packed tensor subclasses
    (through their inner tensors), and the tuples and dicts HQQ keeps."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(stored_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(stored_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(stored_bytes(o) for o in obj.values())
    return 0


def cache_bits(cache, model, tokens: int) -> float:
    """Measured KV bits per element after `tokens` tokens: stored bytes over K and V entries."""
    cfg = model.config
    elements = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens
    if isinstance(cache, GearCache):
        return 8 * cache.memory_report()["total_bytes"] / elements
    held = [stored_bytes(vars(layer).get(k)) for layer in cache.layers
            for k in ("keys", "values", "_quantized_keys", "_quantized_values")]
    return 8 * sum(held) / elements


class DecodeClock(LogitsProcessor):
    """Times the decode steps: its first call comes right after the prefill forward."""

    def __call__(self, input_ids, scores):
        self.calls = getattr(self, "calls", 0) + 1
        now = time.perf_counter()
        self.first = getattr(self, "first", now)
        self.last = now
        return scores

    def tokens_per_second(self) -> float:
        return (self.calls - 1) / (self.last - self.first)


@torch.no_grad()
def free_run(model, ids, name: str, tokens: int):
    """Greedy generation with the named cache -> (new tokens (n,), decode tokens/s, KV bits/element)."""
    cache, clock = make_cache(name, model), DecodeClock()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, logits_processor=LogitsProcessorList([clock]), **{cache_kwarg(model): cache},
    )
    new = out[0, ids.shape[1]:]
    return new, clock.tokens_per_second(), cache_bits(cache, model, out.shape[1] - 1)


@torch.no_grad()
def forced_logits(model, ids, continuation, name: str) -> torch.Tensor:
    """The named cache's next-token logits (n, vocab) along the exact continuation (1, n)."""
    cache = make_cache(name, model)
    if isinstance(cache, GearCache):
        tokens = torch.cat([ids, continuation[:, :-1]], dim=1)
        return forward_with_cache(model, tokens, cache, ids.shape[1])[0, ids.shape[1] - 1:].float()
    return teacher_forced_logits(model, ids, continuation, cache)


def matching_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    differ = (a != b).nonzero()
    return len(a) if len(differ) == 0 else int(differ[0])


def evaluate(model, tokenizer, docs, names, tokens):
    rows = {name: [] for name in ["exact"] + names}
    for i, doc in enumerate(docs):
        ids = tokenizer(gsm8k_prompt(doc), return_tensors="pt").input_ids
        gold = gsm8k_gold(doc)
        continuation, exact_logits = exact_run(model, ids, tokens)
        exact_new, exact_speed, exact_bits = free_run(model, ids, "exact", tokens)
        exact_answer = gsm8k_answer(tokenizer.decode(exact_new))
        rows["exact"].append(dict(top1=1.0, kl=0.0, prefix=tokens, pos=1.0, same_answer=1.0,
                                  correct=float(exact_answer == gold), speed=exact_speed, bits=exact_bits))
        for name in names:
            fidelity = agreement(exact_logits, forced_logits(model, ids, continuation, name))
            new, speed, bits = free_run(model, ids, name, tokens)
            answer = gsm8k_answer(tokenizer.decode(new))
            rows[name].append(dict(
                **fidelity, prefix=matching_prefix(new, exact_new), pos=(new == exact_new).float().mean().item(),
                same_answer=float(answer == exact_answer), correct=float(answer == gold), speed=speed, bits=bits,
            ))
        print(f"question {i + 1}/{len(docs)} done ({ids.shape[1]} prompt tokens)", flush=True)
    return rows


def table(rows) -> str:
    exact_speed = statistics.mean(r["speed"] for r in rows["exact"])
    lines = [
        "| cache | TF top-1 | TF KL (nats) | matching prefix | position agreement | same answer | accuracy "
        "| KV bits/elem | vs fp16 | decode speed vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        m = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        lines.append(
            f"| {name} | {m['top1']:.3f} | {m['kl']:.3f} | {m['prefix']:.1f} | {m['pos']:.3f} | {m['same_answer']:.2f} "
            f"| {m['correct']:.2f} | {m['bits']:.2f} | {16 / m['bits']:.2f}x | {m['speed'] / exact_speed:.2f} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in rows.items():
        if name == "exact":
            continue
        bits, kl = statistics.mean(r["bits"] for r in rs), statistics.mean(r["kl"] for r in rs)
        color = "tab:red" if name.startswith("gear") else "tab:blue" if name.startswith("kivi") else "tab:gray"
        ax.scatter(bits, kl, color=color)
        ax.annotate(name, (bits, kl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("measured KV bits per element")
    ax.set_ylabel("teacher-forced KL(exact || cache), nats")
    ax.set_title("SmolLM2-135M, GSM8K 8-shot: fidelity per stored bit (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder laid out like ../shared/data")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--configs", default=",".join([*GEAR_CONFIGS, *PEERS]))
    parser.add_argument("--plot", type=Path, help="write the KL-vs-bits plot (PNG) here")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    model.eval()
    docs = gsm8k_docs(args.data, args.questions)
    rows = evaluate(model, tokenizer, docs, args.configs.split(","), args.tokens)
    print(f"\nSmolLM2-135M-Instruct (fp32), {args.questions} GSM8K questions, 8-shot, {args.tokens} tokens, "
          f"torch {torch.__version__}\n")
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
