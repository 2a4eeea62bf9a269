"""The layer store (gear_kernels.store): what it keeps is what compress stored, and its dense()
rebuilds every row exactly as decompress does, whatever the rows and chunks around it."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import GearConfig, compress, decompress
from gear_kernels.store import BUCKET, KVStore, PromptPart, StreamPart, buckets

CONFIGS = [
    GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, rank_prompt=4, rank_chunk=2),
    GearConfig(method="gear-l", bits=3, backbone="kcvt", buffer_size=12, rank_prompt=3, rank_chunk=1),
    GearConfig(method="kivi", bits=4, backbone="flexgen", group_size=4, buffer_size=8),
    GearConfig(method="gear", bits=8, group_size=16, buffer_size=16, outlier_ratio=0.1, rank_prompt=5),
    # keys and values of their own widths, int8 low-rank factors, fp16 outliers
    GearConfig(method="gear", bits=2, value_bits=4, group_size=8, buffer_size=8, lowrank_dtype="int8",
               outlier_dtype="fp16", outlier_ratio=0.05),
    GearConfig(method="gear-l", key_bits=3, value_bits=8, backbone="kcvt", buffer_size=12, rank_prompt=3,
               lowrank_dtype="int8"),
]
PROMPT = (13, 0, 29, 2)  # tokens each row stores (0: a row of padding only; 2: fewer than the rank)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rows(config, dtype=torch.float32, heads=2, dim=16):
    keys = [compress(_randn(1, heads, n, dim, seed=n, dtype=dtype), config, "key") if n else None for n in PROMPT]
    values = [compress(_randn(1, heads, n, dim, seed=100 + n, dtype=dtype), config, "value") if n else None for n in PROMPT]
    return keys, values


def _chunks(config, n, dtype=torch.float32, heads=2, dim=16):
    size = config.buffer_size
    return [(compress(_randn(len(PROMPT), heads, size, dim, seed=200 + i, dtype=dtype), config, "key", config.rank(prompt=False)),
             compress(_randn(len(PROMPT), heads, size, dim, seed=300 + i, dtype=dtype), config, "value", config.rank(prompt=False)))
            for i in range(n)]


def _store(config, chunks=3, dtype=torch.float32) -> tuple[KVStore, tuple, list]:
    rows = _rows(config, dtype)
    store = KVStore(batch=len(PROMPT), prompt_end=max(PROMPT)).with_prompt(*rows)
    made = _chunks(config, chunks, dtype)
    for k, v in made:
        store = store.appended(k, v)
    return store, rows, made


def _expected(rows, chunks, side: int) -> torch.Tensor:
    """Each row: zeros, then decompress() of its prompt chunk, then of every streamed chunk."""
    end = max(PROMPT)
    out = []
    for b, n in enumerate(PROMPT):
        pieces = []
        ref = chunks[0][side] if chunks else next(r for r in rows[side] if r is not None)
        heads, dim, dtype = ref.shape[1], ref.shape[3], ref.dtype
        pieces.append(torch.zeros(heads, end - n, dim, dtype=dtype))
        if n:
            pieces.append(decompress(rows[side][b])[0])
        pieces += [decompress(c[side])[b] for c in chunks]
        out.append(torch.cat(pieces, dim=1))
    return torch.stack(out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.codec.bits}-{c.codec.backbone}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_is_decompress_bit_for_bit(config, dtype):
    store, rows, chunks = _store(config, dtype=dtype)
    keys, values = store.dense()
    assert torch.equal(keys, _expected(rows, chunks, 0)) and torch.equal(values, _expected(rows, chunks, 1))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.codec.bits}-{c.codec.backbone}")
def test_the_store_keeps_what_compress_stored(config):
    store, rows, chunks = _store(config)
    stored = sum(t.numel() * t.element_size() for c in [*rows[0], *rows[1]] if c is not None for t in c.tensors().values())
    stored += sum(c.nbytes() for pair in chunks for c in pair)
    report = store.nbytes()
    # beyond compress's own tensors: the outlier buckets; prompt outlier indices in the widest
    # type of the rows; zero low-rank columns of rows shorter than the rank, and of empty rows
    extra = sum(part.outlier_bucket.numel() * 4 for part in store.parts() if part.outlier_bucket is not None)
    lowrank = ("lowrank_a", "lowrank_b", "lowrank_a_scale", "lowrank_b_scale")
    if store.prompt_keys.lowrank_a is not None:
        for side, part in ((0, store.prompt_keys), (1, store.prompt_values)):
            extra += sum(nbytes(getattr(part, name)) for name in lowrank)
            extra -= sum(nbytes(getattr(c, name)) for c in rows[side] if c is not None for name in lowrank)
    if store.prompt_keys.outlier_index is not None:
        for side, part in ((0, store.prompt_keys), (1, store.prompt_values)):
            extra += part.outlier_index.numel() * part.outlier_index.element_size()
            extra -= sum(c.outlier_index.numel() * c.outlier_index.element_size() for c in rows[side] if c is not None)
    assert sum(report.values()) == stored + extra
    assert store.elements() == 2 * 2 * 16 * (sum(PROMPT) + len(PROMPT) * 3 * config.buffer_size)


def test_rows_selected_and_repeated_as_beam_search_does():
    config = CONFIGS[0]
    store, rows, chunks = _store(config)
    order = torch.tensor([2, 2, 0, 3])
    picked = store.select_rows(order)
    keys, values = store.dense()
    k2, v2 = picked.dense()
    assert torch.equal(k2, keys[order]) and torch.equal(v2, values[order])
    assert picked.prompt_keys.lengths.tolist() == [29, 29, 13, 2]
    assert store.prompt_keys.lengths.tolist() == list(PROMPT)  # the original is untouched


def test_dropping_keeps_the_rest_exact():
    config = CONFIGS[0]
    store, rows, chunks = _store(config)
    later = store.without_prompt().without_chunks(2)
    keys, _ = later.dense()
    assert later.offset(config.buffer_size) == max(PROMPT) + 2 * config.buffer_size
    assert torch.equal(keys, torch.stack([decompress(chunks[2][0])[b] for b in range(len(PROMPT))]))
    assert later.stream_keys.codes.is_contiguous() and later.dropped == 2
    assert store.without_prompt().without_chunks(3).stream_keys is None


def test_outlier_buckets_count_the_outliers_before_each_bucket():
    index = torch.tensor([[0, 5, 16 * 3, 16 * 3 + 1, 40 * 3, 47 * 3 + 2]])  # flat t * 3 + d, 3 channels
    got = buckets(index, tokens=48, head_dim=3)
    assert got.tolist() == [[0, 2, 4, 6]] and got.dtype == torch.int32
    part = StreamPart.from_chunk(compress(_randn(2, 2, 40, 16, seed=1), CONFIGS[0], "key"))
    n = part.outlier_index.shape[-1]
    assert part.outlier_bucket.shape == (2, 2, 1, -(-40 // BUCKET) + 1)
    assert bool((part.outlier_bucket[..., -1] == n).all()) and bool((part.outlier_bucket.diff(dim=-1) >= 0).all())


def test_mismatched_parts_are_refused():
    config = CONFIGS[0]
    part = StreamPart.from_chunk(compress(_randn(2, 2, 8, 16, seed=1), config, "key"))
    with pytest.raises(AssertionError, match="share layout"):
        part.append(compress(_randn(2, 2, 12, 16, seed=2), config, "key"))
    with pytest.raises(AssertionError, match="share layout"):
        PromptPart.from_rows([compress(_randn(1, 2, 8, 16, seed=1), config, "key"),
                              compress(_randn(1, 2, 8, 8, seed=2), config, "key")])
    with pytest.raises(AssertionError, match="compressed chunks only"):
        StreamPart.from_chunk(compress(_randn(2, 2, 8, 16, seed=1), GearConfig(method="none"), "key"))
