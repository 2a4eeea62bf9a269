"""Long contexts on CPU (issue 19): prompt compression against prefill, and a decode step over
the compressed prompt on the rebuilt and packed torch paths, as the prompt grows.

    python -m benchmarks.long_context                  # 1k, 4k, 16k, 32k tokens
    python -m benchmarks.long_context --smoke          # tiny sizes, seconds

A random Llama-style model (fp32, CPU) prefills one prompt of T random tokens with a
DynamicCache; a GearCache then takes each layer's exact keys and values as a prefill hands them
over and compresses them (what GearCache does once after every prefill); then one token is
decoded through that cache, once on each path: rebuilt (the layer keeps its store rebuilt as a
working copy, which SDPA reads) and packed torch (use_gear_attention, kernel=torch: the store
rebuilt a block at a time at each step), and once through the exact DynamicCache.

Memory is measured, not computed: the peak resident set (Linux VmHWM, reset through
/proc/self/clear_refs) above what was resident before each call, in a child process in which
glibc maps every block over 64 KiB apart and unmaps it when it is freed (mallopt) and holds no
free memory resident (malloc_trim), so that the peak is what the call itself held at once.
Times come from this process (where fresh mappings would fault in every page): the median of
--repeats (one run above 8k tokens). Batch 1, so prompt compression's per-row loop runs once.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gear_kernels import GearConfig
from lm_eval_gear import GearCache, use_gear_attention
from lm_eval_gear.compat import cache_kwarg

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: blocks above it are mapped, and unmapped when freed


def build_model(smoke: bool) -> LlamaForCausalLM:
    sizes = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256) if smoke else
             dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=1024))
    torch.manual_seed(0)
    config = LlamaConfig(**sizes, max_position_embeddings=1 << 16, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_above_resident(fn) -> float:
    """Run fn once: MB of peak resident memory above what was resident before (see the
    docstring: meaningful in a process that map_large_blocks() set up)."""
    ctypes.CDLL(None).malloc_trim(0)  # the heap's free memory leaves the resident set
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak resident set starts again from the current one
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024 / 1e6


def map_large_blocks() -> None:
    """glibc maps every block over 64 KiB apart and unmaps it when freed, from now on."""
    if ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 16) != 1:
        raise SystemExit("mallopt failed: the peak memory figures need glibc")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


@torch.no_grad()
def measure(model, tokens: int, config: GearConfig, gauge) -> dict:
    """gauge(fn) of each step: the prefill, prompt compression, a decode step through the exact
    cache and on each path; and the bytes the caches report."""
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    step = dict(input_ids=ids[:, -1:], position_ids=torch.tensor([[tokens]]), use_cache=True)
    holder = {}

    def prefill():
        holder["exact"] = DynamicCache(config=model.config)
        model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): holder["exact"]})

    row = {"tokens": tokens, "prefill": gauge(prefill)}
    kv = [(layer.keys, layer.values) for layer in holder["exact"].layers]

    def compress_prompt():  # on the packed path, where a cache builds no working copy
        cache = GearCache(config, model.config)
        for i, (keys, values) in enumerate(kv):
            cache.update(keys, values, i)
        holder["cache"] = cache

    use_gear_attention(model)
    row["compress"] = gauge(compress_prompt)
    model.set_attn_implementation("sdpa")
    row.update(exact_layer_mb=megabytes(kv[0]), exact_mb=megabytes(t for pair in kv for t in pair),
               stored_layer_mb=holder.pop("cache").memory_report()["total_bytes"] / len(kv) / 1e6)
    if gauge is not peak_above_resident:  # each step grows the exact cache, whose old K/V `kv` still holds
        row["exact_step"] = gauge(lambda: model(**step, **{cache_kwarg(model): holder["exact"]}))
    for path in ("rebuilt", "packed"):
        if path == "packed":
            use_gear_attention(model)
        cache = GearCache(config, model.config)
        for i, (keys, values) in enumerate(kv):
            cache.update(keys, values, i)
        # each step feeds a fork of the cache: every call sees the same cache
        row[f"{path}_step"] = gauge(lambda: model(**step, **{cache_kwarg(model): cache.fork()}))  # noqa: B023
        row[f"{path}_working_mb"] = cache.memory_report()["working_bytes"] / 1e6
        model.set_attn_implementation("sdpa")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384,32768", help="comma-separated prompt lengths")
    parser.add_argument("--method", default="gear")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--memory", action="store_true", help="(the child run) print peak memory rows as JSON")
    args = parser.parse_args()
    lengths = [100, 300] if args.smoke else [int(t) for t in args.tokens.split(",")]
    if args.memory:
        map_large_blocks()
    model = build_model(args.smoke)
    config = GearConfig(method=args.method, bits=args.bits, kernel="torch",
                        **({"group_size": 16, "buffer_size": 16} if args.smoke else {}))
    if args.memory:
        for tokens in lengths:
            print(json.dumps(measure(model, tokens, config, peak_above_resident)), flush=True)
        return
    child = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--memory", *sys.argv[1:]],
                           capture_output=True, text=True, check=True)
    peaks = {row["tokens"]: row for row in map(json.loads, child.stdout.splitlines())}
    c = model.config
    print(f"random Llama: {c.num_hidden_layers} layers, {c.num_attention_heads} q heads, {c.num_key_value_heads} kv heads, "
          f"head_dim {c.head_dim}, fp32, {torch.get_num_threads()} threads; {args.method}-{args.bits}; batch 1\n")
    print("Prompt compression (peak: resident memory above the prefill's exact K/V while every layer compresses)\n")
    print("| prompt tokens | prefill (s) | compress (s) | compress / prefill | exact K/V a layer (MB) "
          "| stored a layer (MB) | compression peak (MB) | peak / a layer's K/V |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for tokens in lengths:
        row = measure(model, tokens, config, lambda fn: median_seconds(fn, 1 if tokens > 8192 else args.repeats))  # noqa: B023
        rows.append((row, peaks[tokens]))
        print(f"| {tokens} | {row['prefill']:.3f} | {row['compress']:.3f} | {row['compress'] / row['prefill']:.2f} | "
              f"{row['exact_layer_mb']:.2f} | {row['stored_layer_mb']:.2f} | {peaks[tokens]['compress']:.1f} | "
              f"{peaks[tokens]['compress'] / row['exact_layer_mb']:.2f} |", flush=True)
    print("\nOne decode step over the compressed prompt (peak: resident memory above the caches during the step; "
          "working copy: what the cache reports, all layers)\n")
    print("| prompt tokens | exact K/V, all layers (MB) | exact step (ms) | rebuilt step (ms) | packed torch step (ms) "
          "| rebuilt working copy (MB) | packed torch working copy (MB) | rebuilt step peak (MB) "
          "| packed torch step peak (MB) | packed torch peak / exact K/V |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, peak in rows:
        print(f"| {row['tokens']} | {row['exact_mb']:.1f} | {1e3 * row['exact_step']:.1f} | {1e3 * row['rebuilt_step']:.1f} | "
              f"{1e3 * row['packed_step']:.1f} | {row['rebuilt_working_mb']:.1f} | {row['packed_working_mb']:.1f} | "
              f"{peak['rebuilt_step']:.1f} | {peak['packed_step']:.1f} | "
              f"{peak['packed_step'] / row['exact_mb']:.3f} |")


if __name__ == "__main__":
    main()
