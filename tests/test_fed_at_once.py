"""GearCache.fed_at_once: a continuation scored in one forward, each token attending to what it
would attend to fed one at a time (the store, the chunks compressed before its own, its own
chunk's tokens exactly): the same scores as buffer-aligned pieces, and the same cache after."""

from __future__ import annotations

import random

import pytest
import torch

from gear_kernels import GearConfig, compress
from gear_kernels.codecs import METHODS
from lm_eval_gear import GearCache
from lm_eval_gear.cache import at_once_visibility
from lm_eval_gear import scoring
from lm_eval_gear.scoring import score_one, window
from tiny_models import VOCAB, tiny_model

COMPRESSING = [m for m in METHODS if GearConfig(method=m).compresses]


@pytest.mark.parametrize("held, buffered, new, chunk", [(0, 0, 1, 4), (5, 0, 9, 4), (7, 3, 2, 4), (7, 3, 14, 4), (2, 1, 30, 8)])
def test_each_token_sees_what_it_would_see_alone(held, buffered, new, chunk):
    visible = at_once_visibility(held, buffered, new, chunk)
    flushed = (buffered + new) // chunk * chunk
    assert visible.shape == (new, held + flushed + buffered + new)
    for i in range(new):
        p = buffered + i  # the token's buffer position
        own = p // chunk * chunk  # where its chunk starts
        want = [True] * held + [j < own for j in range(flushed)] + [own <= e <= p for e in range(buffered + new)]
        assert visible[i].tolist() == want


def _windows(seed: int = 0) -> list:
    rng = random.Random(seed)
    return [window([rng.randrange(1, VOCAB) for _ in range(n)], [rng.randrange(1, VOCAB) for _ in range(m)], 4096)
            for n, m in ((5, 30), (20, 3), (33, 17), (2, 60))]


@pytest.mark.parametrize("options", [{}, {"rotation": "hadamard", "sink_tokens": 3}, {"at once": 8}])
@pytest.mark.parametrize("method", COMPRESSING)
def test_at_once_scores_as_piece_by_piece(method, options, monkeypatch):
    """{"at once": 8}: continuations fed 8 tokens (two chunks) a forward rather than whole."""
    options = dict(options)
    monkeypatch.setattr(scoring, "AT_ONCE_TOKENS", options.pop("at once", scoring.AT_ONCE_TOKENS))
    model, config = tiny_model("llama")
    settings = GearConfig(method=method, bits=2, group_size=8, buffer_size=4, **options)
    caches = {"at once": [], "pieces": []}

    def make(mode):
        def cache(mask):
            caches[mode].append(GearCache(settings, config, mask))
            return caches[mode][-1]
        return cache

    at_once = [score_one(model, w, make("at once")) for w in _windows()]
    monkeypatch.setattr(GearCache, "can_feed_at_once", lambda self: False)
    pieces = [score_one(model, w, make("pieces")) for w in _windows()]
    for (a, _), (b, _) in zip(at_once, pieces, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert sum(layer.store.chunks for cache in caches["at once"] for layer in cache.layers) > 20  # flushes crossed
    for a, b in zip(caches["at once"], caches["pieces"], strict=True):
        assert a.get_seq_length() == b.get_seq_length()
        assert [layer.store.chunks for layer in a.layers] == [layer.store.chunks for layer in b.layers]
        assert a.memory_report()["bytes"] == b.memory_report()["bytes"]
        for x, y in zip(a.layers, b.layers, strict=True):
            # the same tokens, computed in one forward instead of several: float rounding apart
            assert torch.allclose(x.decoded[0], y.decoded[0], atol=1e-3)
            assert torch.allclose(x.buffer_k, y.buffer_k, atol=1e-5)


@pytest.mark.parametrize("method", COMPRESSING)
def test_chunks_compressed_together_are_chunks_compressed_alone(method):
    """A flush compresses all its chunks in one call, as rows of one batch: each row on its own,
    so the stored tensors are bitwise those of compressing each chunk alone."""
    settings = GearConfig(method=method, bits=2, group_size=8)
    chunks = torch.randn(5, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 5 chunks of (2, 3, 16, 16)
    together = compress(chunks.reshape(10, 3, 16, 16), settings, "key", 2)
    for j in range(5):
        alone = compress(chunks[j], settings, "key", 2)
        mine = together.select_rows(torch.arange(2 * j, 2 * j + 2))
        assert mine.parts.keys() == alone.parts.keys()
        assert (mine.quantizer, mine.token_group) == (alone.quantizer, alone.token_group)
        for name, tensor in alone.parts.items():
            assert torch.equal(mine.parts[name], tensor), name
