"""The layer store (gear_kernels.store): what it keeps is what compress stored, and its dense()
rebuilds every row exactly as decompress does, whatever the rows and chunks around it."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import GearConfig, compress, decompress
from gear_kernels.corrections.outliers import BUCKET, buckets
from gear_kernels.store import KVStore

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


def _segments(rows, chunks, side: int) -> list[tuple]:
    """(chunk, row of the chunk, batch row, first position) of every segment, in the order the
    store holds them: the prompt rows with tokens, then each streamed chunk's rows."""
    end, size = max(PROMPT), None if not chunks else chunks[0][side].shape[2]
    out = [(rows[side][b], 0, b, end - n) for b, n in enumerate(PROMPT) if n]
    return out + [(c[side], b, b, end + i * size) for i, c in enumerate(chunks) for b in range(len(PROMPT))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.codec.bits}-{c.codec.backbone}")
def test_the_store_keeps_what_compress_stored(config):
    store, rows, chunks = _store(config)
    # entry for entry: each segment's slice of every field is its chunk row's tensor
    for side, part in enumerate(store.parts()):
        segments = _segments(rows, chunks, side)
        assert part.segments == len(segments)
        assert part.rows.tolist() == [b for _, _, b, _ in segments]
        assert part.starts.tolist() == [start for _, _, _, start in segments]
        assert part.tokens.tolist() == [c.shape[2] for c, _, _, _ in segments]
        assert part.groups.tolist() == [c.token_group for c, _, _, _ in segments]
        assert part.fields == segments[0][0].fields() and part.quantizer == segments[0][0].quantizer
        for name, data in part.data.items():
            heads = data.shape[0]
            assert sum(part.counts[name].tolist()) == data.shape[1]
            for s, (chunk, row, _, _) in enumerate(segments):
                want = chunk.parts[name][row].reshape(heads, -1)
                got = data[:, part.offsets[name][s] : part.offsets[name][s] + part.counts[name][s]]
                if name == "outlier_index":  # one type for all segments: the widest among them
                    assert data.element_size() >= want.element_size() and torch.equal(got.long(), want.long()), s
                else:
                    assert got.dtype == want.dtype and torch.equal(got, want), (name, s)
    # and its bytes: compress's, plus outlier indices widened to the widest type of the side
    stored = sum(c.nbytes() for c in [*rows[0], *rows[1]] if c is not None)
    stored += sum(c.nbytes() for pair in chunks for c in pair)
    extra = 0
    for side, part in enumerate(store.parts()):
        if "outlier_index" in part.data:
            wide = part.data["outlier_index"].element_size()
            extra += sum(c.parts["outlier_index"][row].numel() * (wide - c.parts["outlier_index"].element_size())
                         for c, row, _, _ in _segments(rows, chunks, side))
    report = store.nbytes()
    assert sum(report.values()) == stored + extra and report["sinks"] == 0
    by_component = {}
    for c in [*rows[0], *rows[1], *(c for pair in chunks for c in pair)]:
        if c is not None:
            for name, size in c.nbytes(by_component=True).items():
                by_component[name] = by_component.get(name, 0) + size
    assert {k: v for k, v in report.items() if v} == {k: v + (extra if k == "outliers" else 0)
                                                      for k, v in by_component.items()}
    assert store.elements() == 2 * 2 * 16 * (sum(PROMPT) + len(PROMPT) * 3 * config.buffer_size)


def test_rows_selected_and_repeated_as_beam_search_does():
    config = CONFIGS[0]
    store, rows, chunks = _store(config)
    order = torch.tensor([2, 2, 0, 3])
    picked = store.select_rows(order)
    keys, values = store.dense()
    k2, v2 = picked.dense()
    assert torch.equal(k2, keys[order]) and torch.equal(v2, values[order])
    assert picked.prompt_lengths().tolist() == [29, 29, 13, 2]
    assert store.prompt_lengths().tolist() == list(PROMPT)  # the original is untouched
    assert (picked.batch, picked.chunks) == (4, store.chunks)
    for part, source in zip(picked.parts(), store.parts()):  # each new row holds its source row's segments
        for row, src in enumerate(order.tolist()):
            mine, theirs = part.rows == row, source.rows == src
            assert part.starts[mine].tolist() == source.starts[theirs].tolist()
            assert part.tokens[mine].tolist() == source.tokens[theirs].tolist()
        assert part.segments == 4 + 4 * 3


def test_dropping_keeps_the_rest_exact():
    config = CONFIGS[0]
    store, rows, chunks = _store(config)
    later = store.without_prompt().without_chunks(2)
    keys, values = later.dense()
    assert later.offset(config.buffer_size) == max(PROMPT) + 2 * config.buffer_size
    assert torch.equal(keys, torch.stack([decompress(chunks[2][0])[b] for b in range(len(PROMPT))]))
    assert torch.equal(values, torch.stack([decompress(chunks[2][1])[b] for b in range(len(PROMPT))]))
    assert later.dropped == 2 and later.chunks == 1 and not later.has_prompt
    for part in later.parts():  # only the last chunk's segments, copied out: the rest is freed
        assert part.segments == len(PROMPT) and part.starts.tolist() == [max(PROMPT) + 2 * config.buffer_size] * 4
        for name, t in part.data.items():
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
            assert t.shape[1] == chunks[2][0].parts[name][0, 0].numel() * len(PROMPT), name
    empty = store.without_prompt().without_chunks(3)
    assert empty.keys is None and empty.values is None and empty.dense() == (None, None)
    assert sum(empty.nbytes().values()) == 0 and empty.elements() == 0


def test_outlier_buckets_count_the_outliers_before_each_bucket():
    index = torch.tensor([[0, 5, 16 * 3, 16 * 3 + 1, 40 * 3, 47 * 3 + 2]])  # flat t * 3 + d, 3 channels
    got = buckets(index, tokens=48, head_dim=3)
    assert got.tolist() == [[0, 2, 4, 6]] and got.dtype == torch.int32
    config = CONFIGS[0]
    chunk = compress(_randn(2, 2, 40, 16, seed=1), config, "key")
    n = chunk.parts["outlier_index"].shape[-1]
    assert chunk.parts["outlier_bucket"].shape == (2, 2, -(-40 // BUCKET) + 1)
    # stored per segment in the store, -(-T // BUCKET) + 1 entries each, counted from the segment's own outliers
    values = compress(_randn(2, 2, 40, 16, seed=4), config, "value")
    store = KVStore(batch=2, prompt_end=40).with_prompt([chunk.select_rows(torch.tensor([b])) for b in range(2)],
                                                        [values.select_rows(torch.tensor([b])) for b in range(2)])
    store = store.appended(compress(_randn(2, 2, 8, 16, seed=2), config, "key", 2),
                           compress(_randn(2, 2, 8, 16, seed=3), config, "value", 2))
    part = store.keys
    assert part.counts["outlier_bucket"].tolist() == [-(-40 // BUCKET) + 1] * 2 + [-(-8 // BUCKET) + 1] * 2
    for s in range(part.segments):
        mine = part.data["outlier_bucket"][:, part.offsets["outlier_bucket"][s]:][:, : part.counts["outlier_bucket"][s]]
        assert bool((mine[:, 0] == 0).all()) and bool((mine.diff(dim=-1) >= 0).all())
        assert bool((mine[:, -1] == part.counts["outlier_index"][s]).all())
    assert part.counts["outlier_index"][:2].tolist() == [n, n]


def _pair(config, batch, tokens, dim=16, seed=1, rank=None):
    return (compress(_randn(batch, 2, tokens, dim, seed=seed), config, "key", rank),
            compress(_randn(batch, 2, tokens, dim, seed=seed + 1), config, "value", rank))


def test_mismatched_parts_are_refused():
    config = CONFIGS[0]
    # rows of another head_dim
    with pytest.raises(AssertionError, match="share"):
        a, b = _pair(config, 1, 8), _pair(config, 1, 8, dim=8, seed=3)
        KVStore(batch=2, prompt_end=8).with_prompt([a[0], b[0]], [a[1], b[1]])
    # chunks of another quantizer (bits)
    with pytest.raises(AssertionError, match="share"):
        KVStore(batch=2, prompt_end=0).appended(*_pair(config, 2, 8)).appended(
            *_pair(GearConfig(method="gear", bits=4, group_size=8, buffer_size=8), 2, 8))
    with pytest.raises(AssertionError, match="compressed chunks only"):
        KVStore(batch=2, prompt_end=0).appended(*_pair(GearConfig(method="none"), 2, 8))


def test_a_streamed_chunk_of_another_size_is_refused():
    """Streamed chunks sit at prompt_end + i * S (S = chunk_tokens()): a chunk of another size
    would be placed at the wrong positions, so appending it must be refused."""
    config = CONFIGS[0]
    store = KVStore(batch=2, prompt_end=5).appended(*_pair(config, 2, 8))
    with pytest.raises(ValueError, match="chunk of 12 tokens after chunks of 8"):
        store.appended(*_pair(config, 2, 12, seed=3))
