"""GearCache on tiny random models: exactness, padding, flushes, beams, misuse, memory."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from gear_kernels import GearConfig, compress, decompress
from lm_eval_gear import GearCache
from lm_eval_gear.cache import GearLayer
from lm_eval_gear.compat import cache_kwarg
from tiny_models import ARCHITECTURES, assert_same_parts, generate, prompts, tiny_model

GEAR = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, rank_prompt=4, rank_chunk=2)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_method_none_is_bit_identical_to_dynamic_cache(arch_model):
    model, config = arch_model
    ids = prompts(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    cache = GearCache(GearConfig(method="none"), config, mask)
    exact = model(ids, attention_mask=mask, **{cache_kwarg(model): DynamicCache(config=config)}).logits
    ours = model(ids, attention_mask=mask, **{cache_kwarg(model): cache}).logits
    assert torch.equal(exact, ours)
    assert torch.equal(
        generate(model, ids, mask=mask),
        generate(model, ids, GearCache(GearConfig(method="none"), config, mask), mask),
    )


def test_every_architecture_generates_compressed(arch_model):
    model, config = arch_model
    ids = prompts(2, 21)
    cache = GearCache(GEAR, config)
    out = generate(model, ids, cache, max_new_tokens=20)
    assert out.shape == (2, 41)
    gear_layers = [layer for layer in cache.layers if isinstance(layer, GearLayer)]
    assert gear_layers, "no layer was compressed"
    # 20 new tokens: the first is the prefill's own output, 19 enter the cache: 2 chunks of 8 + 3
    assert all(layer.store.chunks == 2 and layer.buffer_k.shape[-2] == 3 for layer in gear_layers)
    assert len(gear_layers) == len(cache.layers), "every layer is compressed, sliding-window ones too"
    assert [layer.is_sliding for layer in cache.layers] == [t == "sliding_attention" for t in _layer_types(config)]


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral: every layer slides when sliding_window is set
        kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
        types = [kind] * config.num_hidden_layers
    return list(types)


def test_config_may_be_a_mapping_of_options(llama):
    _, config = llama
    assert GearCache({"method": "kivi", "bits": "4"}, config).config == GearConfig(method="kivi", bits=4)
    with pytest.raises(TypeError, match="GearConfig or a mapping"):
        GearCache("gear", config)


def test_unsupported_layer_type_is_refused():
    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "linear_attention"]  # as hybrid SSM models declare them
    with pytest.raises(ValueError, match="cannot compress"):
        GearCache(GEAR, config)


def test_padded_batch_gives_the_same_greedy_tokens(llama):
    model, config = llama
    seq = prompts(1, 19, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), seq], dim=1), prompts(1, 26, seed=4)])
    mask = torch.ones_like(batch)
    mask[0, :7] = 0
    out_alone = generate(model, seq, GearCache(GEAR, config), max_new_tokens=20)
    out_padded = generate(model, batch, GearCache(GEAR, config, mask), mask=mask, max_new_tokens=20)
    assert torch.equal(out_alone[0, 19:], out_padded[0, 26:])


CODEC_OPTIONS = GearConfig(method="gear", bits=2, value_bits=4, group_size=8, buffer_size=8, lowrank_dtype="int8",
                           outlier_dtype="fp16")


@pytest.mark.parametrize("gear", [GEAR, CODEC_OPTIONS], ids=["defaults", "codec-options"])
def test_padded_batch_stores_the_same_bytes(gear):
    """The model may round a row's K/V differently inside a batch; given the same K/V, the cache
    stores the same bytes and attends to the same values whatever the padding around them."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 19, 16), torch.randn(1, 2, 19, 16)
    batch_k = torch.cat([torch.cat([torch.randn(1, 2, 7, 16), k], dim=-2), torch.randn(1, 2, 26, 16)])
    batch_v = torch.cat([torch.cat([torch.randn(1, 2, 7, 16), v], dim=-2), torch.randn(1, 2, 26, 16)])
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[0, :7] = 0
    alone, padded = GearCache(gear), GearCache(gear, attention_mask=mask)
    alone.update(k, v, 0)
    padded.update(batch_k, batch_v, 0)
    mine, theirs = alone.layers[0].store, padded.layers[0].store
    row0 = torch.tensor([0])
    assert mine.chunks == theirs.chunks == 0  # the prompt only: every segment is a prompt row
    for own, other in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
        picked = other.select_rows(row0)
        assert_same_parts(own, picked, positions=False)
        # the same tokens at the end of each prompt, whatever the padding before them
        assert torch.equal(own.starts - mine.prompt_end, picked.starts - theirs.prompt_end)
    new_k, new_v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    keys_alone, values_alone = alone.update(new_k[:1], new_v[:1], 0)
    keys, values = padded.update(new_k, new_v, 0)
    assert torch.equal(keys[:1, :, 7:], keys_alone) and torch.equal(values[:1, :, 7:], values_alone)


def test_right_padding_is_refused():
    with pytest.raises(ValueError, match="left padding"):
        GearCache(GEAR, attention_mask=torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize("prompt_len", [3, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("new_tokens", [1, 7, 8, 9, 17])
def test_flush_boundaries_match_manual_compression(prompt_len, new_tokens):
    """What attention sees equals: the prompt compressed with the prompt rank, each full buffer
    compressed with the chunk rank, then the exact buffer."""
    torch.manual_seed(prompt_len * 100 + new_tokens)
    layer = GearLayer(GEAR)
    prompt_k, prompt_v = torch.randn(2, 2, prompt_len, 16), torch.randn(2, 2, prompt_len, 16)
    layer.update(prompt_k, prompt_v)
    stream_k, stream_v = torch.randn(2, 2, new_tokens, 16), torch.randn(2, 2, new_tokens, 16)
    for t in range(new_tokens):
        keys, values = layer.update(stream_k[:, :, t : t + 1], stream_v[:, :, t : t + 1])
    flushed = (new_tokens - 1) // GEAR.buffer_size * GEAR.buffer_size  # flushes happen after attention

    def expected(prompt, stream, kind):
        rows = [decompress(compress(prompt[b : b + 1], GEAR, kind, GEAR.rank(prompt=True))) for b in range(2)]
        parts = [torch.cat(rows)] + [
            decompress(compress(stream[:, :, s : s + GEAR.buffer_size], GEAR, kind, GEAR.rank(prompt=False)))
            for s in range(0, flushed, GEAR.buffer_size)
        ]
        return torch.cat(parts + [stream[:, :, flushed:]], dim=-2)

    assert torch.equal(keys, expected(prompt_k, stream_k, "key"))
    assert torch.equal(values, expected(prompt_v, stream_v, "value"))
    assert layer.get_seq_length() == prompt_len + new_tokens
    assert layer.store.chunks == new_tokens // GEAR.buffer_size


def test_the_store_changes_only_when_a_chunk_is_flushed():
    """Between flushes a layer keeps the same KVStore object, so what packed attention derives
    from it once (its launch tables, in the store's memo) serves every decode step."""
    torch.manual_seed(0)
    layer = GearLayer(GEAR)
    layer.update(torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    stores = []
    for _ in range(2 * GEAR.buffer_size):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
        stores.append(layer.store)
    assert len({id(s) for s in stores}) == 1 + layer.store.chunks  # one store per flush, plus the prompt's


@pytest.mark.parametrize("prompt_len", [2, 8, 13])
def test_generation_across_flushes_and_short_prompts(llama, prompt_len):
    model, config = llama
    cache = GearCache(GEAR, config)
    out = generate(model, prompts(3, prompt_len), cache, max_new_tokens=27)
    assert out.shape == (3, prompt_len + 27)
    assert cache.get_seq_length() == prompt_len + 26


def test_beam_search_with_method_none_matches_dynamic_cache(llama):
    model, config = llama
    ids = prompts(2, 12)
    kwargs = dict(num_beams=3, max_new_tokens=15)
    exact = generate(model, ids, **kwargs)
    assert torch.equal(exact, generate(model, ids, GearCache(GearConfig(method="none"), config), **kwargs))


def test_beam_search_reorders_compressed_rows(llama):
    model, config = llama
    ids = prompts(2, 12)
    out = generate(model, ids, GearCache(GEAR, config), num_beams=3, max_new_tokens=20)
    assert out.shape[0] == 2
    layer = GearLayer(GEAR)
    k = torch.randn(3, 2, 9, 16)
    layer.update(k, k.clone())
    for _ in range(8):
        layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
    before = layer.reconstruct()[0]
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    after = layer.reconstruct()[0]
    assert torch.equal(after, before[[2, 2, 0]])


def test_sampling_is_reproducible_with_a_seed(llama):
    model, config = llama
    ids = prompts(2, 10)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate(model, ids, GearCache(GEAR, config), do_sample=True, max_new_tokens=20))
    assert torch.equal(*runs)


def test_dtype_mismatch_and_batch_change_are_refused():
    layer = GearLayer(GEAR)
    layer.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="dtype and device"):
        layer.update(torch.randn(1, 2, 1, 16, dtype=torch.float16), torch.randn(1, 2, 1, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="fresh GearCache"):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))


def test_reset_makes_a_cache_reusable(llama):
    model, config = llama
    first, second = prompts(1, 11, seed=5), prompts(1, 14, seed=6)
    cache = GearCache(GEAR, config)
    generate(model, first, cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(generate(model, second, cache), generate(model, second, GearCache(GEAR, config)))


@pytest.mark.parametrize("options", [dict(method="kivi"), dict(method="kivi", key_bits=4),
                                     dict(method="gear-l", lowrank_dtype="int8"),
                                     dict(method="gear", value_bits=3, outlier_dtype="fp16", lowrank_dtype="int8")],
                         ids=lambda o: "-".join(map(str, o.values())))
def test_memory_report_counts_the_stored_tensors(llama, options):
    model, config = llama
    cache = GearCache(GearConfig(**{"bits": 2, "group_size": 8, "buffer_size": 8, **options}), config)
    generate(model, prompts(1, 40), cache, max_new_tokens=13)
    report = cache.memory_report()
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for p in layer.store.parts()
                 for t in p.data.values())
    buffered = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.buffer_tensors())
    assert report["total_bytes"] == stored + buffered == sum(report["bytes"].values())
    assert report["bytes"]["buffer"] == buffered > 0
    assert report["elements"] == 2 * 2 * config.num_key_value_heads * 16 * (40 + 12)
    assert report["dense_bytes"] == 4 * report["elements"]
    if options["method"] == "kivi":
        assert report["ratio"] > 3  # fp32 model, 2-bit codes + fp16 scales per 8 + a small buffer
    assert len(report["per_layer"]) == config.num_hidden_layers
