"""sink_tokens: each row's first prompt tokens kept exact beside the compressed rest (attention
sinks). Where they sit, what they cost, and that they go where the prompt goes (beams, windows).
Both attention paths over them: tests/test_packed_attention.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lm_eval_gear import GearCache, GearConfig
from lm_eval_gear.compat import cache_kwarg
from tiny_models import left_padded, prompts, tiny_model

ROWS = (13, 5, 22)  # the 5-token row is shorter than its sinks: all of it is kept exact
SINKS = 6


def _prefilled(model, options: dict, rows=ROWS):
    """(GearCache, DynamicCache, pads) after one forward of a left-padded batch of `rows` lengths."""
    ids, mask = left_padded([prompts(1, n, seed=n)[0] for n in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    config = GearConfig(**{"buffer_size": 8, "group_size": 8, **options})
    caches = GearCache(config, model.config, mask), DynamicCache(config=model.config)
    for cache in caches:
        model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kwarg(model): cache})
    return *caches, (mask.shape[1] - mask.sum(-1)).tolist()


@pytest.mark.parametrize("method", ["kivi", "gear"])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_the_first_tokens_of_each_row_come_back_exact(method, rotation):
    model, _ = tiny_model("llama")
    gear, exact, pads = _prefilled(model, dict(method=method, rotation=rotation, sink_tokens=SINKS))
    # rotated sinks are stored in the rotated basis, like the rest, and rotated back: fp32 rounding
    tol = 0.0 if rotation == "none" else 1e-6
    for layer, reference in zip(gear.layers, exact.layers):
        for rebuilt, true in zip(layer.decoded, (reference.keys, reference.values)):  # the store rebuilt
            for row, pad in enumerate(pads):
                sinks = slice(pad, min(pad + SINKS, rebuilt.shape[2]))
                assert (rebuilt[row, :, sinks] - true[row, :, sinks]).abs().max() <= tol * true.abs().max()
                assert not bool(rebuilt[row, :, :pad].any())  # padding holds nothing
                rest = rebuilt[row, :, pad + SINKS :]
                if rest.shape[1]:
                    assert (rest - true[row, :, pad + SINKS :]).abs().max() > 1e-3  # compressed


def test_sinks_are_stored_and_counted_in_the_model_dtype():
    model, config = tiny_model("llama")
    model = model.to(torch.bfloat16)
    plain, _, _ = _prefilled(model, dict(method="kivi"))
    sunk, _, _ = _prefilled(model, dict(method="kivi", sink_tokens=SINKS))
    report, base = sunk.memory_report(), plain.memory_report()
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # K and V, bf16
    # every row stores SINKS slots: the 5-token row's one empty slot is stored (zeros) and counted
    assert report["bytes"]["sinks"] == config.num_hidden_layers * len(ROWS) * SINKS * per_token
    assert base["bytes"]["sinks"] == 0
    assert report["total_bytes"] == sum(report["bytes"].values())
    assert report["elements"] == base["elements"]  # the same tokens held, some of them exact
    assert report["bytes"]["codes"] < base["bytes"]["codes"]
    for layer in sunk.layers:
        assert layer.store.sinks.keys.dtype == torch.bfloat16
        assert layer.store.sinks.counts.tolist() == [min(n, SINKS) for n in ROWS]


def test_a_prompt_no_longer_than_its_sinks_is_kept_whole():
    model, _ = tiny_model("llama")
    gear, exact, _ = _prefilled(model, dict(method="gear", sink_tokens=SINKS), rows=(4, 6))
    for layer, reference in zip(gear.layers, exact.layers):
        store = layer.store
        assert store.has_prompt and store.prompt_lengths().tolist() == [4, 6]  # all of it in the sinks
        for part in store.parts():  # no compressed prompt segment
            assert not bool((part.starts < store.prompt_end).any())
        assert store.sinks.counts.tolist() == [4, 6]
        keys, values = layer.decoded
        assert torch.equal(keys[0, :, 2:], reference.keys[0, :, 2:]) and torch.equal(keys[1], reference.keys[1])
        assert torch.equal(values[1], reference.values[1])


def test_beam_reordering_moves_the_sinks_with_their_rows():
    model, _ = tiny_model("llama")
    gear, _, _ = _prefilled(model, dict(method="kivi", sink_tokens=SINKS))
    before = [layer.decoded for layer in gear.layers]
    order = torch.tensor([2, 2, 0])
    gear.reorder_cache(order)
    for layer, (keys, values) in zip(gear.layers, before):
        after = layer.store.dense()
        assert torch.equal(after[0], keys[order]) and torch.equal(after[1], values[order])
        assert layer.store.sinks.counts.tolist() == [SINKS, SINKS, SINKS]


def test_a_sliding_window_drops_the_sinks_with_the_prompt():
    model, config = tiny_model("gemma2", sliding_window=7, attn_logit_softcapping=None)
    gear, _, _ = _prefilled(model, dict(method="kivi", sink_tokens=3), rows=(10,))
    ids = prompts(1, 20, seed=5)
    arg = {cache_kwarg(model): gear}
    for t in range(ids.shape[1]):  # 20 steps: the window moves past the prompt
        model(ids[:, t : t + 1], use_cache=True, **arg)
    sliding = [layer for layer in gear.layers if layer.is_sliding]
    full = [layer for layer in gear.layers if not layer.is_sliding]
    assert sliding and full
    assert all(layer.store.sinks is None and not layer.store.has_prompt for layer in sliding)
    assert all(layer.store.sinks.counts.tolist() == [3] for layer in full)


def test_greedy_tokens_of_a_row_alike_alone_and_in_a_padded_batch():
    model, _ = tiny_model("llama")
    rows = [prompts(1, n, seed=n)[0] for n in ROWS]
    ids, mask = left_padded(rows)
    config = GearConfig(method="gear", bits=2, group_size=8, buffer_size=4, sink_tokens=SINKS)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    batch = model.generate(input_ids=ids, attention_mask=mask, **kwargs,
                           **{cache_kwarg(model): GearCache(config, model.config, mask)})
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kwargs,
                               **{cache_kwarg(model): GearCache(config, model.config)})
        new = alone[0, len(row) :]  # may stop early at the end-of-text token; the batch row is padded on
        assert torch.equal(new, batch[b, ids.shape[1] : ids.shape[1] + len(new)])
