"""The rebuilt path's decode step against the number of chunks a layer holds.

    python -m benchmarks.decode_step            # SmolLM2-sized layer: 3 kv heads, head_dim 64
    python -m benchmarks.decode_step --smoke    # tiny sizes, a few seconds

A layer holds the same tokens (a short prompt, then streamed chunks) split into more and more
chunks (smaller buffer_size). Each row is timed in one run, beside the other:

- "GearLayer": what GearCache does at each decode step on the rebuilt path: append the token,
  attend (one query, GQA) over the layer's keys and values, compress the buffer when it is
  full. Timed over buffer_size steps, so one flush is in every measurement, then per step;
- "rebuild per chunk": the same attention after rebuilding the keys and values from the
  chunk objects one by one, as the cache did before the store (kept as the reference it is
  measured against, without its flushes, which only favours it).

Both attend to the same keys and values, bit for bit (checked). GearLayer's step should stay
flat as the chunks multiply; the rebuild grows with them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from gear_kernels import GearConfig, compress, decompress
from lm_eval_gear.cache import GearLayer


def _median(fn, repeats: int, fresh=lambda: None) -> float:
    """Median seconds of fn(fresh()) (fresh() untimed: a new copy of the state fn changes)."""
    fn(fresh())
    times = []
    for _ in range(repeats):
        state = fresh()
        start = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SDPA with K/V repeated per query head, as transformers' repeat_kv does (on CPU, SDPA's
    own enable_gqa is many times slower)."""
    ratio = q.shape[1] // keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(ratio, 1), values.repeat_interleave(ratio, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--streamed", type=int, default=2048, help="streamed tokens a row holds")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    heads, q_heads, dim, prompt = 3, 9, 64, 64
    streamed, sizes, repeats = args.streamed, [1024, 512, 256, 128, 64, 32, 16], args.repeats
    if args.smoke:
        streamed, sizes, repeats = 64, [32, 16, 8], 1
    print(f"one layer, batch {args.batch}, {heads} kv heads / {q_heads} query heads, head_dim {dim}, fp32; "
          f"a {prompt}-token prompt + {streamed} streamed tokens a row; gear 2-bit, median of {repeats}\n")
    print("| buffer_size | chunks held | GearLayer step (ms) | rebuild-per-chunk step (ms) | rebuild / GearLayer |")
    print("|---:|---:|---:|---:|---:|", flush=True)
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    q = randn(args.batch, q_heads, 1, dim)
    for size in sizes:
        config = GearConfig(method="gear", bits=2, buffer_size=size)
        layer = GearLayer(config)
        layer.update(randn(args.batch, heads, prompt, dim), randn(args.batch, heads, prompt, dim))
        stream_k, stream_v = randn(args.batch, heads, streamed, dim), randn(args.batch, heads, streamed, dim)
        for s in range(0, streamed, size):  # fill the layer chunk by chunk, as generation does
            layer.update(stream_k[:, :, s : s + size], stream_v[:, :, s : s + size])
        # the same chunks as objects, for the reference
        chunks = [(compress(stream_k[:, :, s : s + size], config, "key", config.rank(prompt=False)),
                   compress(stream_v[:, :, s : s + size], config, "value", config.rank(prompt=False)))
                  for s in range(0, streamed, size)]
        held_k, held_v = layer.store.dense()  # positions [0, prompt): every row's prompt (no padding here)
        prompt_kv = held_k[:, :, :prompt].clone(), held_v[:, :, :prompt].clone()

        def rebuild():
            keys = torch.cat([prompt_kv[0]] + [decompress(k) for k, _ in chunks], dim=-2)
            values = torch.cat([prompt_kv[1]] + [decompress(v) for _, v in chunks], dim=-2)
            return keys, values

        assert all(torch.equal(a, b) for a, b in zip(layer.reconstruct(), rebuild())), "the paths differ"
        new_k, new_v = randn(args.batch, heads, size, dim), randn(args.batch, heads, size, dim)

        def steps(state: GearLayer):  # size decode steps through a copy of the layer, one flush among them
            for t in range(size):
                keys, values = state.update(new_k[:, :, t : t + 1], new_v[:, :, t : t + 1])
                _attend(q, keys, values)

        ours = _median(steps, repeats, fresh=lambda: copy.deepcopy(layer)) / size
        theirs = _median(lambda _: _attend(q, *rebuild()), repeats)
        print(f"| {size} | {len(chunks)} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {theirs / ours:.1f} |", flush=True)


if __name__ == "__main__":
    main()
