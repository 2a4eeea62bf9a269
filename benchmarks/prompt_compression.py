"""Prompt compression against prefill, as the prompt grows (issue 19: long contexts).

    python -m benchmarks.prompt_compression                  # 1k, 4k, 16k, 32k tokens
    python -m benchmarks.prompt_compression --smoke          # tiny sizes, seconds

A random Llama-style model (fp32, CPU) prefills one prompt of T random tokens with a
DynamicCache; then a GearCache takes each layer's exact keys and values as a prefill hands them
over and compresses them (what GearCache does once after every prefill). Each row: the
prefill's time, the compression's (all layers), their ratio, and the bytes: one layer's exact
K/V, what a layer stores compressed, and the rebuilt path's working copy (a layer's K/V rebuilt,
which the cache keeps for attention). Batch 1, so the per-row loop of prompt compression runs
once; times are the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gear_kernels import GearConfig
from lm_eval_gear import GearCache
from lm_eval_gear.compat import cache_kwarg


def build_model(smoke: bool) -> LlamaForCausalLM:
    sizes = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256) if smoke else
             dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=1024))
    torch.manual_seed(0)
    config = LlamaConfig(**sizes, max_position_embeddings=1 << 16, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, tokens: int, config: GearConfig, repeats: int) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    holder = {}

    def prefill():
        holder["exact"] = DynamicCache(config=model.config)
        model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): holder["exact"]})

    prefill_s = median_seconds(prefill, repeats)
    kv = [(layer.keys, layer.values) for layer in holder["exact"].layers]

    def compress_prompt():
        cache = GearCache(config, model.config)
        for i, (keys, values) in enumerate(kv):
            cache.update(keys, values, i)
        holder["cache"] = cache

    compress_s = median_seconds(compress_prompt, repeats)
    report = holder["cache"].memory_report()
    layers = len(kv)
    return {"tokens": tokens, "prefill_s": prefill_s, "compress_s": compress_s,
            "exact_layer_mb": sum(t.numel() * t.element_size() for t in kv[0]) / 1e6,
            "stored_layer_mb": report["total_bytes"] / layers / 1e6,
            "working_layer_mb": report["working_bytes"] / layers / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--method", default="gear")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    lengths = [100, 300] if args.smoke else [int(t) for t in args.tokens.split(",")]
    model = build_model(args.smoke)
    config = GearConfig(method=args.method, bits=args.bits, **({"group_size": 16, "buffer_size": 16} if args.smoke else {}))
    c = model.config
    print(f"random Llama: {c.num_hidden_layers} layers, {c.num_attention_heads} q heads, {c.num_key_value_heads} kv heads, "
          f"head_dim {c.head_dim}, fp32, {torch.get_num_threads()} threads; {args.method}-{args.bits}; batch 1\n")
    print("| prompt tokens | prefill (s) | compress (s) | compress / prefill | exact K/V a layer (MB) "
          "| stored a layer (MB) | working copy a layer (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in lengths:
        row = measure(model, tokens, config, 1 if tokens > 8192 and not args.smoke else args.repeats)
        print(f"| {tokens} | {row['prefill_s']:.3f} | {row['compress_s']:.3f} | {row['compress_s'] / row['prefill_s']:.2f} | "
              f"{row['exact_layer_mb']:.2f} | {row['stored_layer_mb']:.2f} | {row['working_layer_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
