"""GearCache end to end on a GPU: one random Llama-style model generates with the exact cache,
GEAR on the rebuilt path and GEAR on the packed Triton path; tokens, logits, stored bytes, peak
memory, speed.

    python benchmarks/gpu_generate.py            # CUDA: fp16, 8 layers, batch 4, 2k-token prompts
    python benchmarks/gpu_generate.py --smoke    # CPU, TRITON_INTERPRET=1, tiny sizes

Row 1 of the batch is left-padded, so the packed Triton path reads a prompt chunk without its
pads. It is checked against the rebuilt path (same config, same weights): greedy tokens
position by position, and the largest logit difference over the decode steps both reached on
the same tokens, relative to each step's logit range (a failure exits with status 1). Peak memory is what
`generate` allocates beyond the weights and inputs (activations and logits included, the same
for every row of the table), next to the bytes the cache itself stores.

Needs torch, triton and transformers (no lm_eval).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ARGS.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes")
ARGS.add_argument("--method", default="gear", help="GEAR method of the compressed runs")
ARGS.add_argument("--bits", type=int, default=2)
ARGS.add_argument("--profile", action="store_true", help="also print where the host time of a Triton generate goes (cProfile)")
OPTS = ARGS.parse_args()
if OPTS.smoke:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lm_eval_gear import GearCache, GearConfig, use_gear_attention  # noqa: E402
from lm_eval_gear.compat import cache_kwarg  # noqa: E402

TOLERANCE = 2e-2  # decode-step logits, packed Triton vs rebuilt path, relative to the logit range
PAD = 100  # left padding of row 1


def build_model(smoke: bool, device: str) -> LlamaForCausalLM:
    sizes = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512) if smoke else
             dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000))
    config = LlamaConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.float16
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generate(model, ids, mask, config: GearConfig, new_tokens: int, device: str):
    """(tokens, logits, cache memory report, peak extra bytes, prefill s, decode tokens/s).

    Prefill is timed as a one-token generate; decode tokens/s is batch x (new_tokens - 1) over
    the rest of a full generate."""
    def run(n):
        cache = GearCache(config, model.config, mask)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True, **{cache_kwarg(model): cache})
        return out, cache

    # warm-up at full length: every kernel variant (streamed chunks too) compiles before timing
    run(new_tokens)
    prefill = float("inf")
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        run(1)
        sync(device)
        prefill = min(prefill, time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out, cache = run(new_tokens)
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    decode = ids.shape[0] * (new_tokens - 1) / max(total - prefill, 1e-9)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits).float(), cache.memory_report(), peak, prefill, decode


def profile_generate(model, ids, mask, config: GearConfig, new_tokens: int) -> None:
    """cProfile one (warm) generate: the functions with the most host time of their own."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    cache = GearCache(config, model.config, mask)
    profiler.enable()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, **{cache_kwarg(model): cache})
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def main() -> int:
    device = "cpu" if OPTS.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke", file=sys.stderr)
        return 2
    batch, prompt, new_tokens = (2, 40, 12) if OPTS.smoke else (4, 2048, 128)
    small = dict(group_size=8, buffer_size=8) if OPTS.smoke else {}
    model = build_model(OPTS.smoke, device)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pad = min(PAD, prompt // 4)
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    ids, mask = ids.to(device), mask.to(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1 smoke run)"
    import transformers
    import triton
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}")
    c = model.config
    print(f"model: random Llama, {c.num_hidden_layers} layers, {c.num_attention_heads} q heads, "
          f"{c.num_key_value_heads} kv heads, head_dim {c.head_dim}, {model.dtype}; batch {batch}, prompt "
          f"{prompt} tokens (row 1 left-padded by {pad}), {new_tokens} new tokens, greedy\n")

    runs = [("exact (DynamicCache layers)", GearConfig(method="none")),
            (f"{OPTS.method}-{OPTS.bits}, rebuilt", GearConfig(method=OPTS.method, bits=OPTS.bits, kernel="torch", **small))]
    results = {label: generate(model, ids, mask, config, new_tokens, device) for label, config in runs}
    use_gear_attention(model)  # from here on the model attends through the packed Triton path
    label = f"{OPTS.method}-{OPTS.bits}, packed Triton"
    results[label] = generate(model, ids, mask, GearConfig(method=OPTS.method, bits=OPTS.bits, kernel="triton", **small),
                              new_tokens, device)

    if OPTS.profile:
        profile_generate(model, ids, mask, GearConfig(method=OPTS.method, bits=OPTS.bits, kernel="triton", **small),
                         new_tokens)

    exact_tokens = results[runs[0][0]][0]
    rebuilt_label = runs[1][0]
    rebuilt_tokens, rebuilt_logits = results[rebuilt_label][:2]
    triton_tokens, triton_logits = results[label][:2]
    same = (triton_tokens == rebuilt_tokens).float().mean().item()
    # step i's logits depend on tokens 0..i-1: compare the steps both runs reached on the same
    # tokens; step 0 comes from the prefill over the exact prompt, so it is left out
    agree = (triton_tokens == rebuilt_tokens).all(dim=0).long()  # (new_tokens,)
    steps = min(int(agree.cumprod(0).sum()), new_tokens - 1)
    diff = (triton_logits[1:steps + 1] - rebuilt_logits[1:steps + 1]).abs().amax(-1)  # (steps, batch)
    spread = rebuilt_logits[1:steps + 1].amax(-1) - rebuilt_logits[1:steps + 1].amin(-1)
    rel = (diff / spread).max().item() if steps else float("nan")
    ok = steps > 0 and rel < TOLERANCE

    print("| cache | tokens = exact | KV stored (MB) | bits/elem | peak extra (MB) | prefill (s) | decode tok/s | vs exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    exact_decode = results[runs[0][0]][5]
    for run_label, (tokens, _, report, peak, prefill, decode) in results.items():
        agree = (tokens == exact_tokens).float().mean().item()
        print(f"| {run_label} | {agree:.2f} | {report['total_bytes'] / 1e6:.1f} | {report['bits_per_element']:.2f} | "
              f"{peak / 1e6:.0f} | {prefill:.2f} | {decode:.0f} | {decode / exact_decode:.2f}x |")
    print(f"\npacked Triton vs rebuilt: tokens equal at {same:.2f} of positions; over steps 1-{steps} (same tokens "
          f"before them) logits differ by at most {rel:.1e} of their range (tolerance {TOLERANCE:.0e}): "
          f"{'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
