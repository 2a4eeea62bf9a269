"""The torch path's decode step against the number of chunks a layer holds.

    python -m benchmarks.decode_step            # SmolLM2-sized layer: 3 kv heads, head_dim 64
    python -m benchmarks.decode_step --smoke    # tiny sizes, a few seconds

A layer holds the same tokens (a short prompt, then streamed chunks) split into more and more
chunks (smaller buffer_size). Each row is timed in one run, beside the others:

- "store": what GearCache does at each step on the torch path, KVStore.dense() (the layer's
  keys and values rebuilt in a fixed number of tensor operations) and the attention of one
  query over them;
- "per chunk": the same through a Python loop that decompresses chunk objects one by one, as
  the cache did before the store (kept here as the reference it is measured against).

Both compute the same keys and values, bit for bit (checked). The store's time should stay flat
as the chunks multiply; the loop's grows with them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gear_kernels import GearConfig, compress, decompress
from gear_kernels.store import KVStore


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer(config: GearConfig, batch: int, heads: int, dim: int, prompt: int, streamed: int):
    """The store and the same chunks as objects: one prompt chunk per row, then the stream."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    rows_k = [compress(randn(1, heads, prompt, dim), config, "key") for _ in range(batch)]
    rows_v = [compress(randn(1, heads, prompt, dim), config, "value") for _ in range(batch)]
    store = KVStore(batch=batch, prompt_end=prompt).with_prompt(rows_k, rows_v)
    chunks = []
    size = config.buffer_size
    for _ in range(streamed // size):
        k = compress(randn(batch, heads, size, dim), config, "key", config.rank_chunk)
        v = compress(randn(batch, heads, size, dim), config, "value", config.rank_chunk)
        chunks.append((k, v))
        store = store.appended(k, v)
    return store, (rows_k, rows_v), chunks


def _per_chunk(rows, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """The old reconstruction: every prompt row and every chunk decompressed on its own."""
    keys = [torch.cat([decompress(r) for r in rows[0]])] + [decompress(k) for k, _ in chunks]
    values = [torch.cat([decompress(r) for r in rows[1]])] + [decompress(v) for _, v in chunks]
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--streamed", type=int, default=2048, help="streamed tokens a row holds")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    heads, q_heads, dim, prompt = 3, 9, 64, 64
    streamed, sizes, repeats = args.streamed, [1024, 512, 256, 128, 64, 32, 16], args.repeats
    if args.smoke:
        streamed, sizes, repeats = 64, [32, 16, 8], 2
    torch.set_num_threads(torch.get_num_threads())
    print(f"one layer, batch {args.batch}, {heads} kv heads / {q_heads} query heads, head_dim {dim}, fp32; "
          f"a {prompt}-token prompt + {streamed} streamed tokens a row; gear 2-bit, median of {repeats}\n")
    print("| buffer_size | chunks held | store step (ms) | per-chunk step (ms) | per chunk / store |")
    print("|---:|---:|---:|---:|---:|", flush=True)
    q = torch.randn(args.batch, q_heads, 1, dim)
    for size in sizes:
        config = GearConfig(method="gear", bits=2, buffer_size=size)
        store, rows, chunks = _layer(config, args.batch, heads, dim, prompt, streamed)
        assert all(torch.equal(a, b) for a, b in zip(store.dense(), _per_chunk(rows, chunks)))
        new = _median_seconds(lambda: _attend(q, *store.dense()), repeats)
        old = _median_seconds(lambda: _attend(q, *_per_chunk(rows, chunks)), repeats)
        print(f"| {size} | {len(chunks)} | {new * 1e3:.2f} | {old * 1e3:.2f} | {old / new:.2f} |", flush=True)


if __name__ == "__main__":
    main()
