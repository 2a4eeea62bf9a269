"""Sliding-window layers are compressed too, and hold only what the window can still see."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import GearConfig, compress, decompress
from lm_eval_gear import GearCache
from lm_eval_gear.cache import GearLayer
from lm_eval_gear.compat import cache_kwarg
from tiny_models import assert_same_parts, generate, left_padded, prompts, tiny_model

GEAR = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, rank_prompt=4, rank_chunk=2)


def test_a_window_longer_than_the_context_compresses_everything():
    """Mistral-7B ships sliding_window=4096: every layer slides, and all of a short context is kept."""
    long_window, _ = tiny_model("mistral", sliding_window=4096)
    no_window, config = tiny_model("mistral", sliding_window=None)
    ids = prompts(2, 40)
    cache = GearCache(GEAR, long_window.config)
    assert all(layer.is_sliding for layer in cache.layers)
    out = generate(long_window, ids, cache, max_new_tokens=20)
    report = cache.memory_report()
    assert report["ratio"] > 2 and report["bytes"]["codes"] > 0
    # nothing has left the window, so the cache holds what a full-attention cache holds
    full = GearCache(GEAR, config)
    assert torch.equal(out, generate(no_window, ids, full, max_new_tokens=20))
    assert report["total_bytes"] == full.memory_report()["total_bytes"]


def test_dropping_what_left_the_window_changes_nothing_the_model_sees():
    """Gemma-2 style (window 24, alternating layers), generation past several windows: the same
    tokens and logits as a cache that keeps every compressed chunk (the model's sliding mask
    hides the dropped tokens anyway). The prompts fit the window, so both compress them alike."""
    model, config = tiny_model("gemma2")
    rows = [prompts(1, 19, seed=5)[0], prompts(1, 13, seed=6)[0]]
    ids, mask = left_padded(rows)
    windowed, keeps_all = GearCache(GEAR, config, mask), GearCache(GEAR, attention_mask=mask)
    kwargs = dict(max_new_tokens=40, output_logits=True, return_dict_in_generate=True)
    a = generate(model, ids, windowed, mask=mask, **kwargs)
    b = generate(model, ids, keeps_all, mask=mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)
    sliding = [layer for layer in windowed.layers if layer.is_sliding]
    assert len(sliding) == 2
    seen = 19 + 39
    for layer in sliding:
        held = layer.get_seq_length() - layer.offset()
        assert layer.get_seq_length() == seen
        # the window's last 23 tokens, plus at most one chunk that is partly out
        assert config.sliding_window - 1 <= held < config.sliding_window - 1 + GEAR.buffer_size
    held_bytes = sum(windowed.memory_report()["per_layer"][i]["elements"] for i in (0, 2))
    all_bytes = sum(keeps_all.memory_report()["per_layer"][i]["elements"] for i in (0, 2))
    assert held_bytes < all_bytes / 2


def test_window_bookkeeping_against_manual_compression():
    """Window 10, buffer 8: the prompt keeps its last 9 tokens; chunks are the buffer's, dropped
    once all their tokens are older than the window; a long piece drops chunks as it flushes."""
    torch.manual_seed(0)
    layer = GearLayer(GEAR, sliding_window=10)
    prompt_k, prompt_v = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    assert layer.update(prompt_k, prompt_v)[0] is prompt_k  # prefill attends to the whole prompt
    assert (layer.offset(), layer.get_mask_sizes(1)) == (4, (10, 4))
    stream_k, stream_v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    attended = [layer.update(stream_k[:, :, t : t + 1], stream_v[:, :, t : t + 1]) for t in range(12)]
    # seen 25: the prompt (positions 4..12) has left the window of the next query (16..25)
    assert layer.get_seq_length() == 25 and layer.offset() == 13 and layer.store.chunks == 1

    def rebuilt(x, stream, kind):
        prompt = decompress(compress(x[:, :, 4:], GEAR, kind, GEAR.rank(prompt=True)))
        chunk = decompress(compress(stream[:, :, :8], GEAR, kind, GEAR.rank(prompt=False)))
        return torch.cat([prompt, chunk, stream[:, :, 8:9]], dim=-2)

    # token 8 (position 21) still saw the prompt, which was dropped right after it
    keys, values = attended[8]
    assert torch.equal(keys, rebuilt(prompt_k, stream_k, "key"))
    assert torch.equal(values, rebuilt(prompt_v, stream_v, "value"))
    assert attended[9][0].shape[-2] == 8 + 2
    # a 20-token piece (positions 25..44) fills three chunks; the next query (45) sees 36 on, so
    # the old chunk 13..20 and the new 21..28 are dropped, 29..36 and 37..44 kept
    layer.update(torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16))
    assert layer.get_seq_length() == 45 and layer.store.dropped == 2 and layer.store.chunks == 2
    assert layer.offset() == 29 and layer.get_mask_sizes(1) == (17, 29) and layer.buffer_k.shape[-2] == 0


def test_memory_report_counts_what_is_held():
    model, config = tiny_model("gemma2")
    cache = GearCache(GearConfig(method="kivi", bits=2, group_size=8, buffer_size=8), config)
    generate(model, prompts(1, 40), cache, max_new_tokens=30)
    for layer, report in zip(cache.layers, cache.memory_report()["per_layer"]):
        held = layer.get_seq_length() - layer.offset()
        assert report["elements"] == 2 * config.num_key_value_heads * config.head_dim * held
        assert (held < layer.get_seq_length()) == layer.is_sliding


def test_method_none_keeps_transformers_sliding_layers():
    model, config = tiny_model("gemma2")
    ids = prompts(1, 30)
    exact = model(ids, **{cache_kwarg(model): None}).logits
    ours = model(ids, **{cache_kwarg(model): GearCache(GearConfig(method="none"), config)}).logits
    assert torch.equal(exact, ours)


@pytest.mark.parametrize("window", [3, 10])
def test_forced_pieces_through_a_window(window):
    """A multi-token piece longer than the window (scoring) sees what one token at a time sees."""
    torch.manual_seed(window)
    k, v = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    one, piece = GearLayer(GEAR, sliding_window=window), GearLayer(GEAR, sliding_window=window)
    one.update(k[:, :, :6], v[:, :, :6])
    piece.update(k[:, :, :6], v[:, :, :6])
    for t in range(6, 14):
        one.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    piece.update(k[:, :, 6:14], v[:, :, 6:14])  # ends on the flush at 14
    assert (one.offset(), one.get_seq_length(), one.store.chunks) == (piece.offset(), piece.get_seq_length(), piece.store.chunks)
    for a, b in zip(one.store.parts(), piece.store.parts(), strict=True):
        assert_same_parts(a, b)
