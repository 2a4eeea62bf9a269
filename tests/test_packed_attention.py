"""The packed Triton path (kernel=triton, here under TRITON_INTERPRET) against the rebuilt path
and against each prompt run alone: left-padded batches of prompts of different lengths, a flush
and tokens in the buffer (interpreted Triton is slow: the packed torch path in blocks, tested
against the rebuilt path here too, goes through two), GQA 1 and 4, fp32/fp16/bf16 models,
Gemma-2 style sliding layers."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import attention_reference
from gear_kernels.codecs import METHODS
from gear_kernels.quantizers import QUANTIZERS
from lm_eval_gear import GearCache, GearConfig, use_gear_attention
from lm_eval_gear.attention import gear_attention, hand_over
from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.forcing import forward_with_cache
from tiny_models import VOCAB, left_padded, prompts, tiny_model

SETTINGS = dict(method="gear", bits=2, group_size=8, buffer_size=8)
FORCED = dict(SETTINGS, group_size=4, buffer_size=4)  # flushes every 4 tokens: few (slow, interpreted) steps
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _pair(arch: str, dtype: torch.dtype, **overrides):
    """The same weights twice: one attends as usual (the rebuilt path), one through use_gear_attention."""
    plain, _ = tiny_model(arch, **overrides)
    packed, _ = tiny_model(arch, **overrides)
    use_gear_attention(packed)
    return plain.to(dtype), packed.to(dtype)


def _forced(model, ids, mask, continuation, kernel, **options):
    """Logits (batch, steps, vocab) of a left-padded prompt batch, then `continuation` (batch,
    steps) fed one token a step, with the position ids and mask generate() would give."""
    cache = GearCache(GearConfig(**{**FORCED, **options}, kernel=kernel), model.config, mask)
    arg = {cache_kwarg(model): cache}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = [model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **arg).logits[:, -1]]
    for t in range(continuation.shape[1] - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits.append(model(continuation[:, t : t + 1], attention_mask=mask, position_ids=positions,
                            use_cache=True, **arg).logits[:, -1])
    return torch.stack(logits, dim=1).float()


CASES = [  # arch, dtype, config overrides
    ("llama", torch.float32, {}),  # GQA 3 (6 query heads, 2 kv heads)
    ("llama", torch.float16, dict(num_attention_heads=2, num_key_value_heads=2)),  # GQA 1
    ("llama", torch.bfloat16, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_size=64)),  # GQA 4
    ("gemma2", torch.float32, dict(sliding_window=7, attn_logit_softcapping=None)),  # sliding layers
]


@pytest.mark.parametrize("arch,dtype,overrides", CASES, ids=lambda c: str(c))
def test_triton_equals_torch_equals_each_prompt_alone(arch, dtype, overrides):
    plain, packed = _pair(arch, dtype, **overrides)
    rows = [prompts(1, n, seed=n)[0] for n in (13, 5, 22)]
    ids, mask = left_padded(rows)
    continuation = prompts(3, 7, seed=7)  # 6 fed tokens: a flush of 4, then 2 in the buffer
    torch_path = _forced(plain, ids, mask, continuation, "torch")
    triton_path = _forced(packed, ids, mask, continuation, "triton")
    scale = torch_path.abs().max()
    assert (triton_path - torch_path).abs().max() <= TOL[dtype] * scale
    for b, row in enumerate(rows):
        alone = _forced(plain, row[None], torch.ones(1, len(row), dtype=torch.long), continuation[b : b + 1], "torch")
        assert (alone[0] - torch_path[b]).abs().max() <= TOL[dtype] * scale, f"row {b}"


@pytest.mark.parametrize("method", ["kivi", "gear"])
def test_a_rotated_store_attends_alike_on_both_paths(method):
    """rotation=hadamard: packed Triton attends in the rotated basis (query and buffer rotated,
    output rotated back), the rebuilt path over keys and values rotated back; the same logits."""
    plain, packed = _pair("llama", torch.float32)
    ids, mask = left_padded([prompts(1, n, seed=n)[0] for n in (13, 5, 22)])
    continuation = prompts(3, 7, seed=7)
    torch_path = _forced(plain, ids, mask, continuation, "torch", method=method, rotation="hadamard")
    triton_path = _forced(packed, ids, mask, continuation, "triton", method=method, rotation="hadamard")
    scale = torch_path.abs().max()
    assert (triton_path - torch_path).abs().max() / scale < TOL[torch.float32]
    unrotated = _forced(plain, ids, mask, continuation, "torch", method=method)
    assert (unrotated - torch_path).abs().max() / scale > 100 * TOL[torch.float32]  # the rotation did something


@pytest.mark.parametrize("options", [*({"method": m} for m in METHODS if GearConfig(method=m).compresses),
                                     {"method": "kivi", "sink_tokens": 3, "rotation": "hadamard"}], ids=str)
def test_the_packed_torch_path_in_blocks_attends_as_the_rebuilt_path(options, monkeypatch):
    """kernel=torch under use_gear_attention: the store read in blocks of 5 tokens a row (so
    blocks cut prompts, chunks, sinks and padding) gives the rebuilt path's logits."""
    monkeypatch.setattr(attention_reference, "BLOCK_TOKENS", 5)
    plain, packed = _pair("llama", torch.float32)
    ids, mask = left_padded([prompts(1, n, seed=n)[0] for n in (13, 5, 22)])
    continuation = prompts(3, 11, seed=7)
    rebuilt = _forced(plain, ids, mask, continuation, "torch", **options)
    blocked = _forced(packed, ids, mask, continuation, "torch", **options)
    assert (blocked - rebuilt).abs().max() <= TOL[torch.float32] * rebuilt.abs().max()


def test_packed_scoring_pieces_match_the_torch_path():
    """Several queries at once (buffer-aligned pieces), causal inside the buffer."""
    plain, packed = _pair("llama", torch.float32)
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    expected = forward_with_cache(plain, ids, GearCache(GearConfig(**SETTINGS, kernel="torch"), plain.config), 11)
    got = forward_with_cache(packed, ids, GearCache(GearConfig(**SETTINGS, kernel="triton"), packed.config), 11)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_triton_without_packed_attention_is_refused():
    plain, _ = _pair("llama", torch.float32)
    cache = GearCache(GearConfig(**SETTINGS, kernel="triton"), plain.config)
    with pytest.raises(ValueError, match="use_gear_attention"):
        plain(torch.ones(1, 5, dtype=torch.long), **{cache_kwarg(plain): cache})


def test_a_padded_batch_the_cache_does_not_know_is_refused():
    """A plain forward passes no position ids: a cache built without the mask compressed the pads
    as tokens, and the packed Triton path says so rather than attend to them."""
    _, packed = _pair("llama", torch.float32)
    ids, mask = left_padded([prompts(1, 9, seed=1)[0], prompts(1, 4, seed=2)[0]])
    cache = GearCache(GearConfig(**SETTINGS, kernel="triton"), packed.config)  # no mask
    arg = {cache_kwarg(packed): cache}
    packed(ids, attention_mask=mask, use_cache=True, **arg)
    step = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with pytest.raises(ValueError, match="pads rows that the GearCache compressed"):
        packed(prompts(2, 1, seed=3), attention_mask=step, use_cache=True, **arg)


class _Module:
    layer_idx = 5
    scaling = 0.25


def test_stand_ins_without_their_store_raise():
    """Nothing rides on the tensors: attention finds the store by layer index or fails loudly."""
    q = torch.randn(1, 2, 1, 16)
    stand_in = torch.zeros(()).expand(1, 2, 7, 16)
    with pytest.raises(RuntimeError, match="no compressed store was handed over"):
        gear_attention(_Module(), q, stand_in, stand_in, None)
    # a store handed over for this layer, but the model passes other K/V: refused as well
    cache = GearCache(GearConfig(**SETTINGS))
    cache.update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), 0)
    layer = cache.layers[0]
    layer.buffer_k = layer.buffer_v = torch.randn(1, 2, 1, 16)
    hand_over(5, layer.packed(), 7)
    with pytest.raises(RuntimeError, match="handed a store of 7 tokens"):
        gear_attention(_Module(), q, torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), None)


@pytest.mark.parametrize("options", [dict(method="gear"), dict(method="kivi", rotation="hadamard")], ids=str)
def test_sinks_attend_alike_on_both_paths_and_alone(options):
    """sink_tokens: the packed Triton path reads the exact sinks ahead of the buffer, a row with
    fewer of them (the 5-token prompt, all sinks) starting past its empty slots; the rebuilt path
    places them in its working copy. Same logits, and each prompt alike alone."""
    options = dict(options, sink_tokens=6)
    plain, packed = _pair("llama", torch.float32)
    rows = [prompts(1, n, seed=n)[0] for n in (13, 5, 22)]
    ids, mask = left_padded(rows)
    continuation = prompts(3, 7, seed=7)
    torch_path = _forced(plain, ids, mask, continuation, "torch", **options)
    triton_path = _forced(packed, ids, mask, continuation, "triton", **options)
    scale = torch_path.abs().max()
    assert (triton_path - torch_path).abs().max() / scale < TOL[torch.float32]
    for b, row in enumerate(rows):
        alone = _forced(plain, row[None], torch.ones(1, len(row), dtype=torch.long), continuation[b : b + 1], "torch",
                        **options)
        assert (alone[0] - torch_path[b]).abs().max() / scale < TOL[torch.float32], f"row {b}"
    without = _forced(plain, ids, mask, continuation, "torch", **dict(options, sink_tokens=0))
    assert (without - torch_path).abs().max() / scale > 100 * TOL[torch.float32]  # the sinks did something


@pytest.mark.parametrize("backbone", list(QUANTIZERS))
def test_gear_over_every_quantizer_attends_alike_on_both_paths(backbone):
    """method=gear over each registered quantizer (turboquant: rotated by default, so the cache
    rotates the queries and the outputs back): the packed Triton path equals the rebuilt path."""
    options = dict(backbone=backbone, group_size=4 if QUANTIZERS[backbone].grouped else None)
    plain, packed = _pair("llama", torch.float32)
    ids, mask = left_padded([prompts(1, n, seed=n)[0] for n in (13, 6)])
    continuation = prompts(2, 7, seed=3)
    torch_path = _forced(plain, ids, mask, continuation, "torch", **options)
    triton_path = _forced(packed, ids, mask, continuation, "triton", **options)
    assert (triton_path - torch_path).abs().max() <= TOL[torch.float32] * torch_path.abs().max()
