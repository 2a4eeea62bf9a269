"""Every registered codec, and the codec options: keys and values of their own widths
(key_bits, value_bits), fp16 outliers (outlier_dtype), int8 low-rank factors (lowrank_dtype).

Each codec round-trips within its bound: the backbone within half a step of every entry that
is not an outlier, outliers exact (or within fp16 rounding), and the low-rank factors adding no
more than their own product; its stored bytes are what its tensors hold.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from gear_kernels import GearConfig, bits_per_element, compress, decompress
from gear_kernels.codecs import CODECS, METHODS
from gear_kernels.corrections.lowrank import factor, product, quantize_factor
from gear_kernels.packing import packed_length
from gear_kernels.store import STORED, KVStore, SinkPart
from test_compression import (
    COMPONENT_OF, assert_outliers_exact, assert_within_half_step, config_of, outlier_mask, randn, relative_error,
)

FP16_MAX = torch.finfo(torch.float16).max
VARIANTS = {  # per method: option sets to run besides its defaults
    "kivi": [dict(key_bits=4, value_bits=2), dict(bits=3, value_bits=8, backbone="flexgen")],
    "gear-l": [dict(lowrank_dtype="int8"), dict(key_bits=2, value_bits=4, lowrank_dtype="int8", backbone="kcvt")],
    "gear": [dict(outlier_dtype="fp16"), dict(lowrank_dtype="int8", outlier_dtype="fp16", key_bits=3, value_bits=2)],
}
CASES = [(method, options) for method in METHODS for options in [{}, *VARIANTS.get(method, [])]]


def case_id(case) -> str:
    method, options = case
    return "-".join([method, *(f"{k}={v}" for k, v in options.items())])


def structured(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, heads, tokens, dim): rank-3 signal + noise + 1% spikes, as K/V look (never zeros)."""
    batch, heads, tokens, dim = shape
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(batch, heads, tokens, 3, generator=g) @ torch.randn(batch, heads, 3, dim, generator=g)
    x = signal + 0.3 * torch.randn(*shape, generator=g)
    spikes = torch.rand(*shape, generator=g) < 0.01
    return torch.where(spikes, 12 * x.sign() * (x.abs() + 1), x).to(dtype)


LOWRANK = ("lowrank_a", "lowrank_b", "lowrank_a_scale", "lowrank_b_scale")


def without_lowrank(chunk):
    return dataclasses.replace(chunk, parts={n: t for n, t in chunk.parts.items() if n not in LOWRANK})


def lowrank_of(chunk) -> torch.Tensor:
    """A B^T of the chunk's stored factors (int8 ones times their column scales), (B, H, T, D) fp32."""
    parts = chunk.parts
    a = factor(parts["lowrank_a"], parts.get("lowrank_a_scale"))  # (B, H, T, r)
    b_scale = parts.get("lowrank_b_scale")  # (B, H, 1, r): one a chunk
    b = factor(parts["lowrank_b"], None if b_scale is None else b_scale[..., None, :])  # (B, H, 1, D, r)
    return product(a, b, torch.zeros(chunk.shape[2], dtype=torch.long))


def stored_bytes(chunk) -> dict[str, int]:
    """Bytes of the chunk's tensors, by component (test_compression.COMPONENT_OF), counted here
    from the tensors themselves; only the components present."""
    out = {}
    for name, t in chunk.parts.items():
        out[COMPONENT_OF[name]] = out.get(COMPONENT_OF[name], 0) + t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_codec_round_trips_within_its_bound(case, kind, dtype):
    method, options = case
    config = config_of(method, group_size=16, **options)
    x = structured(2, 3, 37, 40, seed=1, dtype=dtype)  # partial groups of 16 both ways
    chunk = compress(x, config, kind, 3)
    out = decompress(chunk)
    assert out.shape == x.shape and out.dtype == dtype
    if not config.compresses:
        assert torch.equal(out, x)
        return
    assert chunk.quantizer.bits == config.codec.bits_for(kind)
    assert_within_half_step(x, without_lowrank(chunk))  # the backbone, outliers aside
    if config.uses_outliers:
        if config.codec.outlier_dtype == "model":
            assert_outliers_exact(x, chunk)
        else:
            assert chunk.parts["outlier_values"].dtype == torch.float16
            index = chunk.parts["outlier_index"].long()
            kept = out.reshape(2, 3, -1).gather(-1, index).float()
            want = x.reshape(2, 3, -1).gather(-1, index).float()
            assert ((kept - want).abs() <= want.abs() * 2.0**-10).all()  # fp16 (and model dtype) rounding
    if config.uses_lowrank:
        lowrank = lowrank_of(chunk)
        backbone = decompress(without_lowrank(chunk)).float()
        info = torch.finfo(dtype)
        slack = info.eps * (out.float().abs() + backbone.abs() + lowrank.abs()) + info.tiny
        keep = ~outlier_mask(chunk)
        assert ((out.float() - backbone - lowrank).abs() <= slack)[keep].all()  # out = D + L, rounded once
        assert relative_error(x, chunk) < relative_error(x, without_lowrank(chunk))  # and L helps


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_stored_bytes_are_the_tensors_bytes(case):
    method, options = case
    config = config_of(method, buffer_size=8, group_size=8, **options)
    x = structured(1, 2, 21, 24, seed=2)
    for kind in ("key", "value"):
        chunk = compress(x, config, kind)
        assert chunk.nbytes(by_component=True) == stored_bytes(chunk)
        assert chunk.nbytes() == sum(t.numel() * t.element_size() for t in chunk.parts.values())
    if not config.compresses:
        return
    rows = [(compress(structured(1, 2, n, 24, seed=n), config, "key"),
             compress(structured(1, 2, n, 24, seed=n + 1), config, "value")) for n in (21, 5)]
    sinks = SinkPart.from_rows([structured(1, 2, n, 24, seed=n + 2) for n in (3, 1)],
                               [structured(1, 2, n, 24, seed=n + 3) for n in (3, 1)])
    store = KVStore(batch=2, prompt_end=24).with_prompt([r[0] for r in rows], [r[1] for r in rows], sinks)
    store = store.appended(*_streamed(config))
    counted = dict.fromkeys(STORED, 0)
    for part in store.parts():
        for name, t in part.data.items():
            counted[COMPONENT_OF[name]] += t.numel() * t.element_size()
    counted["sinks"] = 2 * 2 * 2 * 3 * 24 * 4  # K and V, 2 rows, 2 heads, 3 slots (one row has 2 empty), fp32
    assert store.nbytes() == counted
    for part in store.parts():
        per_segment = {"rows", "starts", "tokens", "groups"}  # a few integers a segment: not counted
        held = {n for n in vars(part) if isinstance(getattr(part, n), torch.Tensor)}
        assert held <= per_segment, held - per_segment  # every stored tensor is under data, counted above
        assert {f.name for f in part.fields} == part.data.keys() == part.offsets.keys() == part.counts.keys()


def _streamed(config):
    return (compress(structured(2, 2, 8, 24, seed=7), config, "key", 2),
            compress(structured(2, 2, 8, 24, seed=8), config, "value", 2))


@pytest.mark.parametrize("key_bits, value_bits", [(4, 2), (2, 8), (3, 4)])
def test_key_and_value_bits_give_their_own_code_bytes(key_bits, value_bits):
    config = GearConfig(method="kivi", key_bits=key_bits, value_bits=value_bits)
    x = randn(1, 2, 30, 40, seed=3)
    keys, values = compress(x, config, "key"), compress(x, config, "value")
    assert (keys.quantizer.bits, values.quantizer.bits) == (key_bits, value_bits)
    assert keys.nbytes(by_component=True)["codes"] == 2 * 30 * packed_length(40, key_bits)
    assert values.nbytes(by_component=True)["codes"] == 2 * 30 * packed_length(40, value_bits)
    same = GearConfig(method="kivi", bits=key_bits)
    assert keys.nbytes() == compress(x, same, "key").nbytes()  # keys are what bits=key_bits stores
    assert_within_half_step(x, keys)
    assert_within_half_step(x, values)


def test_int8_factors_and_fp16_outliers_store_fewer_bits_and_still_beat_kivi():
    """fp32 model: the factors at 1 byte an entry (+ a scale a column) and the outlier values at
    2 bytes; gear still well below kivi's error at the same bits, on low-rank + outlier data."""
    x = structured(2, 2, 128, 64, seed=4)
    base = dict(method="gear", bits=2)
    for kind in ("key", "value"):
        kivi = compress(x, GearConfig(method="kivi", bits=2), kind)
        full = compress(x, GearConfig(**base), kind)
        small = compress(x, GearConfig(**base, lowrank_dtype="int8", outlier_dtype="fp16"), kind)
        parts, small_parts = full.nbytes(by_component=True), small.nbytes(by_component=True)
        a, b, r = full.parts["lowrank_a"], full.parts["lowrank_b"], full.parts["lowrank_a"].shape[-1]
        assert small_parts["lowrank"] == parts["lowrank"] // 2 + 2 * 2 * (2 * r * 2)  # + fp16 scales
        n = full.parts["outlier_values"].numel()
        assert small_parts["outliers"] == parts["outliers"] - 2 * n  # 4 -> 2 bytes a value
        assert bits_per_element(kivi) < bits_per_element(small) < bits_per_element(full)
        assert relative_error(x, small) < 0.5 * relative_error(x, kivi)
        assert relative_error(x, small) < 1.1 * relative_error(x, full)
        assert a.dtype == torch.float16 and small.parts["lowrank_a"].dtype == torch.int8
        assert b.shape == small.parts["lowrank_b"].shape


def test_int8_factor_quantization_is_symmetric_per_column_within_half_a_step():
    f = randn(3, 50, 4, seed=5) * torch.tensor([1e-3, 1.0, 30.0, 0.0])  # one zero column
    codes, scale = quantize_factor(f)
    assert codes.dtype == torch.int8 and scale.shape == (3, 1, 4) and scale.dtype == torch.float16
    assert int(codes.abs().max()) <= 127 and torch.equal(scale[..., 3], torch.zeros(3, 1, dtype=torch.float16))
    assert ((factor(codes, scale) - f).abs() <= scale.float() / 2 * (1 + 1e-6)).all()


def test_fp16_outliers_beyond_fp16_range_are_refused_not_made_inf():
    x = randn(1, 1, 16, 16, seed=6)
    x[0, 0, 3, 5] = 1e6  # an outlier: it never enters a quantization range
    kept = compress(x, GearConfig(method="gear", outlier_ratio=0.05), "key")
    assert decompress(kept)[0, 0, 3, 5] == 1e6  # the model's dtype keeps it exactly
    with pytest.raises(ValueError, match=r"1 key outliers beyond the fp16 range .* use outlier_dtype=model"):
        compress(x, GearConfig(method="gear", outlier_ratio=0.05, outlier_dtype="fp16"), "key")


@pytest.mark.parametrize("method", [m for m in METHODS if CODECS[m]().compresses])
def test_batch_rows_store_the_same_bytes_with_every_option(method):
    config = config_of(method, group_size=16, key_bits=3, value_bits=4, lowrank_dtype="int8", outlier_dtype="fp16")
    x = structured(3, 2, 33, 24, seed=9)
    x[1] *= 50
    for kind in ("key", "value"):
        together = compress(x, config, kind)
        for row in range(3):
            alone = compress(x[row:row + 1], config, kind)
            mine = together.select_rows(torch.tensor([row]))
            assert mine.parts.keys() == alone.parts.keys()
            assert (mine.quantizer, mine.token_group) == (alone.quantizer, alone.token_group)
            for name, t in alone.parts.items():
                assert torch.equal(mine.parts[name], t), name


# ------------------------------------------------------------------ Triton, under TRITON_INTERPRET=1

TRITON_CASES = [  # options, dtype, prompt rows, chunks, buffer
    (dict(key_bits=4, value_bits=2), torch.float16, (23, 9), 1, 3),
    (dict(key_bits=3, value_bits=8, lowrank_dtype="int8", outlier_dtype="fp16"), torch.float32, (17, 0), 2, 2),
    (dict(key_bits=2, value_bits=4, lowrank_dtype="int8", backbone="flexgen"), torch.bfloat16, (30, 11), 1, 1),
]
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2, torch.float32: 2e-5}


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py sets it)")
@pytest.mark.parametrize("options, dtype, prompt, chunks, n_buf", TRITON_CASES)
def test_triton_attention_equals_torch_with_codec_options(options, dtype, prompt, chunks, n_buf):
    pytest.importorskip("triton")
    from gear_kernels import triton_attention as ta
    from gear_kernels.attention_reference import decode_attention_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GearConfig(method="gear", group_size=16, buffer_size=16, **options)
    heads, dim = 2, 40  # odd head_dim: partial words and partial channel groups

    def kv(batch, tokens, seed):
        return structured(batch, heads, tokens, dim, seed=seed, dtype=dtype).to(device)

    store = KVStore(batch=len(prompt), prompt_end=max(prompt))
    store = store.with_prompt([compress(kv(1, n, 10 + n), config, "key") if n else None for n in prompt],
                              [compress(kv(1, n, 20 + n), config, "value") if n else None for n in prompt])
    for i in range(chunks):
        store = store.appended(compress(kv(len(prompt), 16, 30 + i), config, "key", 2),
                               compress(kv(len(prompt), 16, 40 + i), config, "value", 2))
    assert store.keys.quantizer.bits == config.codec.key_bits and store.values.quantizer.bits == config.codec.value_bits
    k_buf, v_buf = kv(len(prompt), n_buf, 50), kv(len(prompt), n_buf, 51)
    q = structured(len(prompt), 3 * heads, 1, dim, seed=52, dtype=dtype).to(device)  # GQA 3
    ref = decode_attention_torch(q, store, k_buf, v_buf, dim ** -0.5)
    out = ta.decode_attention_triton(q, store, k_buf, v_buf, dim ** -0.5, block_n=16, split_tokens=16)
    assert not torch.isnan(out).any()
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL[dtype], err
