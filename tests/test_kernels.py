"""Triton kernels against their torch references, on fresh random inputs with odd shapes.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py); with
CUDA they run for real. Every output and scratch buffer is poisoned (NaN, or all-ones codes)
before each run, so an element a kernel forgets to write fails the comparison. The interpreter
is slow per program, so shapes are small, blocks large and grids tiny; tile and split sizes
are forced down where a test needs several tiles, splits or outlier blocks.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from contextlib import contextmanager

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)
pytest.importorskip("triton")

from gear_kernels import GearConfig, decompress, resolve_kernel  # noqa: E402
from gear_kernels import dispatch  # noqa: E402
from gear_kernels.codecs import CODECS  # noqa: E402
from gear_kernels.quantizers import QUANTIZERS  # noqa: E402
from gear_kernels import triton_attention as ta  # noqa: E402
from gear_kernels import triton_device as td  # noqa: E402
from gear_kernels import triton_quantize as tq  # noqa: E402
from gear_kernels.attention_reference import block_plan, decode_attention_torch  # noqa: E402
from gear_kernels.chunk import compress as compress_torch  # noqa: E402
from gear_kernels.rotation import hadamard_signs  # noqa: E402
from gear_kernels.store import KVStore, SinkPart  # noqa: E402

# relative error (max |out - ref| / max |ref|) allowed per model dtype; bf16 also absorbs the
# interpreter's truncating fp32 -> bf16 store (up to one bf16 ulp, 2^-7)
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(tq, "POISON", True)
    monkeypatch.setattr(ta, "POISON", True)


def kv(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int, kind: str) -> torch.Tensor:
    """Random K or V like a model's: keys with a few loud channels, values with rare spikes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, dim, generator=g)
    if kind == "key":
        x = x * (1 + 6 * (torch.rand(dim, generator=g) < 0.08).float()) + 0.5
    else:
        x = x + 12 * (torch.rand(x.shape, generator=g) < 0.003).float()
    return x.to(dtype).to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the output: an element was left unwritten"
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def assert_same_chunk(a, b) -> None:
    """Two chunks store the same tensors, bitwise, and read them alike."""
    assert a.parts.keys() == b.parts.keys()
    assert (a.shape, a.dtype, a.quantizer, a.token_group, a.fields()) == \
        (b.shape, b.dtype, b.quantizer, b.token_group, b.fields())
    for name in a.parts:
        assert a.parts[name].dtype == b.parts[name].dtype and a.parts[name].shape == b.parts[name].shape, name
        assert torch.equal(a.parts[name], b.parts[name]), f"{name} differs"


def compress_triton(x, config, kind, rank=None):
    """chunk.compress with the quantizer's Triton encode (triton_quantize.quantize_pack)."""
    return compress_torch(x, config, kind, rank, kernel="triton")


# ---------------------------------------------------------------- quantize + pack

QUANT_CASES = [  # backbone, bits, batch, tokens, head_dim, dtype, group_size
    ("kivi", 2, 3, 37, 64, torch.float16, 32),
    ("kivi", 3, 1, 70, 128, torch.bfloat16, 64),
    ("kivi", 4, 1, 101, 64, torch.float16, 64),
    ("kivi", 8, 3, 19, 128, torch.bfloat16, 16),
    ("kcvt", 2, 1, 53, 128, torch.bfloat16, None),  # kcvt: whole groups, no size
    ("kcvt", 3, 3, 21, 64, torch.float16, None),
    ("kcvt", 4, 1, 66, 64, torch.float32, None),
    ("kcvt", 8, 1, 41, 128, torch.float16, None),
    ("flexgen", 2, 1, 29, 128, torch.float16, 48),
    ("flexgen", 3, 3, 45, 64, torch.bfloat16, 64),
    ("flexgen", 4, 1, 77, 128, torch.bfloat16, 32),
    ("flexgen", 8, 3, 13, 64, torch.float16, 64),
]


@pytest.mark.parametrize("backbone,bits,batch,tokens,dim,dtype,group", QUANT_CASES)
def test_quantize_pack_matches_reference_bitwise(backbone, bits, batch, tokens, dim, dtype, group):
    """Codes, scales, zero points and outliers: the same bits as the torch reference."""
    config = GearConfig(method="gear", bits=bits, backbone=backbone, group_size=group, rank_prompt=0)
    for kind, seed in (("key", 1), ("value", 2)):
        x = kv(batch, 2, tokens, dim, dtype, seed + bits, kind)
        assert_same_chunk(compress_triton(x, config, kind), compress_torch(x, config, kind))


QUANTIZE_PACK_CASES = [  # bits, rows, tokens, head_dim, dtype, group, per_channel
    (2, 3, 37, 64, torch.float16, 16, True),  # per channel: a partial last token group
    (3, 2, 21, 40, torch.bfloat16, 21, True),  # one group of all the tokens (kcvt keys); 3-bit words
    (4, 1, 9, 24, torch.float32, 8, False),  # per token: groups of channels
    (8, 2, 5, 40, torch.float16, 16, False),  # a partial last channel group
    (3, 1, 6, 19, torch.float32, 19, False),  # one group of the whole vector; a partial 3-byte word
]


@pytest.mark.parametrize("bits,rows,tokens,dim,dtype,group,per_channel", QUANTIZE_PACK_CASES)
def test_quantize_pack_with_exclude_matches_the_torch_encode(bits, rows, tokens, dim, dtype, group, per_channel):
    """quantize_pack(x, exclude (rows, T, D) bool, ...) -> codes (rows, T, W), scale and zero
    (rows, D, NG) per channel else (rows, T, NG): bitwise Uniform.encode(kernel='torch'), whose
    per-channel scales lie (rows, NG, D). Excluded entries, made huge here, stretch no range."""
    from gear_kernels.packing import packed_length
    from gear_kernels.quantizers.uniform import Uniform

    x = kv(rows, 1, tokens, dim, torch.float32, bits, "value").reshape(rows, tokens, dim)
    exclude = torch.rand(rows, tokens, dim, generator=torch.Generator().manual_seed(bits)) < 0.1
    exclude = exclude.to(DEVICE)
    x = torch.where(exclude, 1e3, x).to(dtype).contiguous()
    quantizer = Uniform(bits=bits, per_channel=per_channel, group=group)
    want = quantizer.encode(x, exclude, kernel="torch")
    codes, scale, zero = tq.quantize_pack(x, exclude, bits, group, per_channel)
    n_groups = -(-(tokens if per_channel else dim) // group)
    across = dim if per_channel else tokens
    assert codes.shape == (rows, tokens, packed_length(dim, bits)) and codes.dtype == torch.uint8
    assert scale.shape == zero.shape == (rows, across, n_groups) and scale.dtype == zero.dtype == torch.float16
    if per_channel:
        scale, zero = scale.transpose(-1, -2), zero.transpose(-1, -2)
    assert torch.equal(codes, want["codes"])
    assert torch.equal(scale, want["scale"]) and torch.equal(zero, want["zero"])
    assert float(want["scale"].float().max()) < 1e3 / 2  # the excluded entries were left out of every range
    # and Uniform.encode with kernel="triton" is the same again, in the chunk's layout
    got = quantizer.encode(x, exclude, kernel="triton")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_quantize_pack_refuses_an_exclude_of_another_layout():
    x = kv(2, 1, 5, 16, torch.float32, 1, "key").reshape(2, 5, 16).contiguous()
    flat = torch.zeros(2, 5 * 16, dtype=torch.bool, device=DEVICE)  # the former (rows, T * D) layout
    with pytest.raises(AssertionError, match=r"exclude must be \(rows, T, D\) bool"):
        tq.quantize_pack(x, flat, 2, 4, True)
    with pytest.raises(AssertionError, match=r"exclude must be \(rows, T, D\) bool"):
        tq.quantize_pack(x, torch.zeros(2, 5, 16, dtype=torch.uint8, device=DEVICE), 2, 4, True)


@pytest.mark.parametrize("method,backbone,bits,kind,dtype,dim", [
    ("gear", "kivi", 2, "key", torch.float16, 128),
    ("gear-l", "flexgen", 3, "value", torch.bfloat16, 64),
    ("gear", "kcvt", 4, "value", torch.float32, 40),
])
def test_compress_with_lowrank_matches_reference(method, backbone, bits, kind, dtype, dim):
    """The same codes feed the same residual (the quantizer's torch decode) and the same power
    iteration: the same factors, bitwise, on every device."""
    config = GearConfig(method=method, bits=bits, backbone=backbone, rank_prompt=3)
    x = kv(2, 2, 83, dim, dtype, 5, kind)
    assert_same_chunk(compress_triton(x, config, kind), compress_torch(x, config, kind))
    int8 = GearConfig(method=method, bits=bits, backbone=backbone, rank_prompt=3, lowrank_dtype="int8")
    assert_same_chunk(compress_triton(x, int8, kind), compress_torch(x, int8, kind))


def test_quantize_edge_cases_match_reference():
    """Constant groups (scale 0), groups whose every entry is an outlier, one token, tiny dims."""
    config = GearConfig(method="gear", bits=2, group_size=4, outlier_ratio=0.5, rank_prompt=0)
    const = torch.full((1, 1, 9, 16), -3.25, dtype=torch.float16, device=DEVICE)
    for kind in ("key", "value"):
        assert_same_chunk(compress_triton(const, config, kind), compress_torch(const, config, kind))
        x = kv(1, 1, 5, 16, torch.float16, 3, kind)
        assert_same_chunk(compress_triton(x, config, kind), compress_torch(x, config, kind))
        one = kv(1, 2, 1, 16, torch.bfloat16, 4, kind)
        assert_same_chunk(compress_triton(one, config, kind), compress_torch(one, config, kind))
    # the largest fp16 values quantize (scale rounded up to exactly 65504 / 3 is fine)
    near = torch.tensor([-65504.0, 65504.0, 0.0, 1.0] * 4, dtype=torch.float16, device=DEVICE).reshape(1, 1, 4, 4)
    plain = GearConfig(method="kivi", bits=2, group_size=4)
    for kind in ("key", "value"):
        assert_same_chunk(compress_triton(near, plain, kind), compress_torch(near, plain, kind))


def test_dispatch_compress_picks_the_triton_encode():
    """dispatch.compress with kernel 'triton' (or config.kernel) encodes by quantize_pack, 'torch' never."""
    calls = []
    real = tq.quantize_pack

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    x = kv(1, 2, 9, 16, torch.float16, 6, "key")
    config = GearConfig(method="gear", bits=2, group_size=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tq, "quantize_pack", counted)
        assert_same_chunk(dispatch.compress(x, config, "key", kernel="triton"), compress_torch(x, config, "key"))
        assert len(calls) == 1
        assert_same_chunk(dispatch.compress(x, GearConfig(method="gear", bits=2, group_size=4, kernel="triton"), "key"),
                          compress_torch(x, config, "key"))
        assert len(calls) == 2
        dispatch.compress(x, config, "key", kernel="torch")
        assert len(calls) == 2


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_quantize_refuses_what_the_reference_refuses():
    big = torch.full((1, 1, 4, 16), 1e6, device=DEVICE)
    big[..., 0, 0] = -1e6
    with pytest.raises(ValueError, match="fp16 range"):
        compress_torch(big, GearConfig(method="kivi"), "value")
    with pytest.raises(ValueError, match="fp16 range"):
        compress_triton(big, GearConfig(method="kivi"), "value")
    bad = kv(1, 1, 4, 16, torch.float16, 0, "key")
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        compress_triton(bad, GearConfig(), "key")


# ---------------------------------------------------------------- decode attention

def make_store(config, batch, heads, dim, dtype, prompt, chunks, seed, compressor=compress_torch, end=None):
    """A KVStore: prompt[b] tokens of row b (0: none; None: no prompt part) compressed row by
    row at the prompt rank, ending at position `end` (default: the longest row's end), then
    `chunks` streamed chunks of buffer_size tokens at the chunk rank."""
    store = KVStore(batch=batch, prompt_end=end or (max(prompt) if prompt else 0))
    if prompt:
        rows_k = [compressor(kv(1, heads, n, dim, dtype, seed + 10 * b, "key"), config, "key") if n else None
                  for b, n in enumerate(prompt)]
        rows_v = [compressor(kv(1, heads, n, dim, dtype, seed + 10 * b + 1, "value"), config, "value") if n else None
                  for b, n in enumerate(prompt)]
        store = store.with_prompt(rows_k, rows_v)
    for i in range(chunks):
        size, rank = config.buffer_size, config.rank(prompt=False)
        store = store.appended(compressor(kv(batch, heads, size, dim, dtype, seed + 100 + i, "key"), config, "key", rank),
                               compressor(kv(batch, heads, size, dim, dtype, seed + 200 + i, "value"), config, "value", rank))
    return store


ATTN_CASES = [
    # method, backbone, bits, group, buffer, dim, ratio, batch, q_len, dtype, prompt rows, chunks, n_buf, block_n, split
    ("gear", "kivi", 2, 64, 64, 128, 1, 1, 1, torch.float16, (101,), 1, 5, None, None),
    ("gear", "kivi", 2, 32, 48, 64, 3, 3, 1, torch.bfloat16, (150, 97, 3), 2, 7, 16, 48),
    ("gear", "flexgen", 4, 64, 64, 128, 8, 3, 1, torch.float16, (77, 77, 60), 0, 3, 32, None),
    ("gear-l", "kcvt", 3, None, 64, 64, 3, 1, 3, torch.bfloat16, (45,), 1, 9, None, None),
    ("kivi", "kivi", 8, 64, 32, 128, 1, 3, 1, torch.float16, (90, 12, 50), 2, 0, 32, 64),
    ("gear", "kivi", 3, 64, 64, 128, 8, 3, 1, torch.bfloat16, (70, 0, 33), 1, 2, 32, 32),
    ("gear", "kivi", 2, 64, 64, 64, 1, 1, 1, torch.float32, (130,), 0, 1, None, None),
    ("gear", "kivi", 2, 16, 16, 64, 3, 1, 1, torch.float16, (70,), 3, 0, 32, None),
    ("gear", "kcvt", 4, None, 8, 16, 3, 3, 1, torch.bfloat16, (21, 8, 5), 2, 4, 16, 16),
    ("gear", "kivi", 2, 64, 64, 64, 4, 2, 1, torch.float16, None, 2, 3, None, None),  # streamed chunks only
]


@pytest.mark.parametrize(
    "method,backbone,bits,group,buffer,dim,ratio,batch,q_len,dtype,prompt,chunks,n_buf,block_n,split", ATTN_CASES
)
def test_decode_attention_matches_reference(method, backbone, bits, group, buffer, dim, ratio, batch, q_len, dtype,
                                            prompt, chunks, n_buf, block_n, split):
    heads = 2 if ratio < 8 else 1
    seed = bits * 7 + dim + ratio
    ranks = dict(rank_prompt=4, rank_chunk=2) if CODECS[method]().uses_lowrank else {}
    config = GearConfig(method=method, backbone=backbone, bits=bits, group_size=group, buffer_size=buffer, **ranks)
    store = make_store(config, batch, heads, dim, dtype, prompt, chunks, seed)
    k_buf = kv(batch, heads, n_buf, dim, dtype, seed + 1, "key") if n_buf else None
    v_buf = kv(batch, heads, n_buf, dim, dtype, seed + 2, "value") if n_buf else None
    q = kv(batch, heads * ratio, q_len, dim, dtype, seed + 3, "value")
    scale = dim ** -0.5
    ref = decode_attention_torch(q, store, k_buf, v_buf, scale)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention_triton(q, store, k_buf, v_buf, scale, block_n=block_n, split_tokens=split, out=out)
    assert rel_err(out, ref) < TOL[dtype]


def compositions():
    """Every quantizer (QUANTIZERS) under every method that compresses (CODECS), at a width both take."""
    cases = []
    for method, params in CODECS.items():
        if not params().compresses:
            continue
        for backbone, quantizer in QUANTIZERS.items():
            cases.append(pytest.param(method, backbone, min(quantizer.allowed_bits), id=f"{method}-{backbone}"))
    return cases


@pytest.mark.parametrize("method,backbone,bits", compositions())
def test_every_composition_attends_as_the_reference(method, backbone, bits):
    """Triton = torch for each quantizer x corrections, with prompt rows, chunks and the buffer."""
    config = GearConfig(method=method, backbone=backbone, bits=bits, buffer_size=16)
    store = make_store(config, 2, 2, 64, torch.float32, (37, 20), 2, 11)
    k_buf, v_buf = kv(2, 2, 3, 64, torch.float32, 1, "key"), kv(2, 2, 3, 64, torch.float32, 2, "value")
    q = kv(2, 4, 1, 64, torch.float32, 3, "value")
    ref = decode_attention_torch(q, store, k_buf, v_buf, 0.125)
    out = ta.decode_attention_triton(q, store, k_buf, v_buf, 0.125, block_n=16, split_tokens=16)
    assert rel_err(out, ref) < TOL[torch.float32]


SINK_CASES = [  # dtype, prompt rows, sinks of each row, n_buf, q_len, block_n
    (torch.float16, (37, 0, 20), (4, 3, 4), 5, 1, None),  # the second row: sinks only
    (torch.bfloat16, (50, 9), (0, 6), 3, 3, 16),  # a row without sinks; causal queries
    (torch.float32, (70,), (5,), 0, 1, 16),  # no buffer: the sinks alone ahead of it
    (torch.float16, (0, 0), (3, 2), 2, 1, None),  # prompts of sinks only
]


@pytest.mark.parametrize("dtype,prompt,sinks,n_buf,q_len,block_n", SINK_CASES)
def test_decode_attention_with_sinks_matches_reference(dtype, prompt, sinks, n_buf, q_len, block_n):
    """Triton reads the sinks ahead of the buffer, each row from its first filled slot."""
    config = GearConfig(method="gear", bits=2, group_size=16, buffer_size=16)
    batch, heads, dim = len(prompt), 2, 64
    store = make_store(config, batch, heads, dim, dtype, prompt, 1, 5, end=max(p + n for p, n in zip(prompt, sinks)))
    kept = SinkPart.from_rows([kv(1, heads, n, dim, dtype, 40 + b, "key") for b, n in enumerate(sinks)],
                              [kv(1, heads, n, dim, dtype, 50 + b, "value") for b, n in enumerate(sinks)])
    store = dataclasses.replace(store, sinks=kept, prompt_start=0)  # rows of sinks only are a prompt too
    k_buf = kv(batch, heads, n_buf, dim, dtype, 1, "key") if n_buf else None
    v_buf = kv(batch, heads, n_buf, dim, dtype, 2, "value") if n_buf else None
    q = kv(batch, heads * 3, q_len, dim, dtype, 3, "value")
    ref = decode_attention_torch(q, store, k_buf, v_buf, 0.125)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention_triton(q, store, k_buf, v_buf, 0.125, block_n=block_n, split_tokens=block_n, out=out)
    assert rel_err(out, ref) < TOL[dtype]
    plain = dataclasses.replace(store, sinks=dataclasses.replace(kept, counts=torch.zeros_like(kept.counts)))
    without = decode_attention_torch(q, plain, k_buf, v_buf, 0.125)
    assert rel_err(without, ref) > 5 * TOL[dtype]  # the sinks were attended to


def test_a_stores_launch_tables_are_built_once_and_follow_the_buffer(monkeypatch):
    """Decode steps over one store reuse its tables and work list (built on the first call; the
    buffer grows under them) and still attend as the reference; a store with one more chunk
    builds its own."""
    built = []
    tables = ta._tables
    monkeypatch.setattr(ta, "_tables", lambda *a: built.append(1) or tables(*a))
    config = GearConfig(method="gear", bits=2, group_size=16, buffer_size=16)
    store = make_store(config, 2, 2, 64, torch.float32, (37, 20), 1, 13)
    k_all, v_all = kv(2, 2, 16, 64, torch.float32, 1, "key"), kv(2, 2, 16, 64, torch.float32, 2, "value")
    q = kv(2, 4, 1, 64, torch.float32, 3, "value")
    chunk = lambda kind, seed: compress_torch(kv(2, 2, 16, 64, torch.float32, seed, kind), config, kind,  # noqa: E731
                                              config.rank(prompt=False))
    longer = store.appended(chunk("key", 30), chunk("value", 31))
    for n_buf, held in ((3, store), (9, store), (4, longer)):
        k_buf, v_buf = k_all[:, :, :n_buf].contiguous(), v_all[:, :, :n_buf].contiguous()
        ref = decode_attention_torch(q, held, k_buf, v_buf, 0.125)
        out = ta.decode_attention_triton(q, held, k_buf, v_buf, 0.125, block_n=16, split_tokens=16)
        assert rel_err(out, ref) < TOL[torch.float32]
    assert len(built) == 2


@pytest.mark.parametrize("with_sinks", [False, True])
def test_a_rotated_store_is_attended_in_the_models_basis(with_sinks):
    """A store that holds its K/V rotated (KVStore.rotation) takes q and the buffer in the
    model's basis and returns attention in it, on both paths: Triton = the torch reference =
    attention over what dense() rebuilds (the model's basis) and the buffer."""
    config = GearConfig(method="gear", bits=4, group_size=16, buffer_size=16)
    dim, signs = 64, hadamard_signs(64, seed=5)
    store = KVStore(batch=2, prompt_end=30, rotation=signs)
    rows = [(kv(1, 2, n, dim, torch.float32, 60 + b, "key"), kv(1, 2, n, dim, torch.float32, 70 + b, "value"))
            for b, n in enumerate((30, 17))]
    cut = 3 if with_sinks else 0
    rows_k = [compress_torch(store.to_basis(k[:, :, cut:]), config, "key") for k, _ in rows]
    rows_v = [compress_torch(store.to_basis(v[:, :, cut:]), config, "value") for _, v in rows]
    sinks = SinkPart.from_rows([store.to_basis(k[:, :, :cut]) for k, _ in rows],
                               [store.to_basis(v[:, :, :cut]) for _, v in rows]) if with_sinks else None
    store = store.with_prompt(rows_k, rows_v, sinks)
    k_buf, v_buf = kv(2, 2, 5, dim, torch.float32, 1, "key"), kv(2, 2, 5, dim, torch.float32, 2, "value")
    q = kv(2, 4, 1, dim, torch.float32, 3, "value")
    keys, values = store.dense()  # (2, 2, 30, dim): row 1's first 13 positions hold nothing
    visible = torch.ones(2, 1, 1, 35, dtype=torch.bool)
    visible[1, ..., :13] = False
    k_all, v_all = (torch.cat([t, b], 2).repeat_interleave(2, 1) for t, b in ((keys, k_buf), (values, v_buf)))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=visible, scale=0.125)
    ref = decode_attention_torch(q, store, k_buf, v_buf, 0.125)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention_triton(q, store, k_buf, v_buf, 0.125, block_n=16, split_tokens=16, out=out)
    assert rel_err(ref, expected) < 1e-5 and rel_err(out, expected) < TOL[torch.float32]
    assert torch.allclose(store.from_basis(store.to_basis(keys)), keys, atol=1e-5)
    unrotated = dataclasses.replace(store, rotation=None)  # the same codes read as if held unrotated
    assert rel_err(ta.decode_attention_triton(q, unrotated, k_buf, v_buf, 0.125), expected) > 10 * TOL[torch.float32]


@pytest.mark.parametrize("bits", [2, 3])
def test_the_codes_alignment_hint_holds_at_every_segment_and_head(bits):
    """The kernel is told its codes' pointers are ALIGN-byte aligned (vectorized loads): ALIGN
    must divide the codes' address at every segment and head, and be the largest power of two
    up to 16 that does."""
    config = GearConfig(method="gear", bits=bits, group_size=16, buffer_size=16)
    store = make_store(config, 3, 2, 64, torch.float16, (37, 20, 5), 2, 17)
    for side in store.parts():
        codes = side.data[side.quantizer.fields[0].name]
        addresses = [codes.data_ptr() + codes.element_size() * (h * codes.stride(0) + int(o))
                     for h in range(codes.shape[0]) for o in side.offsets[side.quantizer.fields[0].name]]
        align = ta._alignment(side)
        assert all(a % align == 0 for a in addresses)
        assert align == 16 or any(a % (2 * align) for a in addresses)
    assert ta._alignment(store.values) == (16 if bits == 2 else 8)  # 16 or 24 bytes of codes a token


def test_dispatch_triton_matches_torch_on_a_triton_compressed_store():
    """decode_attention(kernel=...) over chunks made by compress_triton; rows reordered (beams)."""
    config = GearConfig(method="gear", bits=2, group_size=32, buffer_size=32, kernel="triton")
    store = make_store(config, 2, 2, 64, torch.float16, (40, 21), 2, 9, compressor=dispatch.compress)
    prompt = store.keys.starts < store.prompt_end
    assert "outlier_values" in store.keys.data and prompt.any() and (~prompt).any()
    k_buf = kv(2, 2, 6, 64, torch.float16, 1, "key")
    v_buf = kv(2, 2, 6, 64, torch.float16, 2, "value")
    q = kv(2, 6, 1, 64, torch.float16, 3, "value")
    ours = dispatch.decode_attention(q, store, k_buf, v_buf, 0.125, kernel="triton")
    ref = dispatch.decode_attention(q, store, k_buf, v_buf, 0.125, kernel="torch")
    assert rel_err(ours, ref) < TOL[torch.float16]
    store = store.select_rows(torch.tensor([1, 1]))
    ours = dispatch.decode_attention(q, store, k_buf, v_buf, 0.125, kernel="triton")
    assert rel_err(ours, dispatch.decode_attention(q, store, k_buf, v_buf, 0.125, kernel="torch")) < TOL[torch.float16]


def test_unsorted_outliers_are_refused():
    config = GearConfig(method="gear", bits=2, group_size=32, buffer_size=32)
    store = make_store(config, 1, 2, 64, torch.float16, None, 1, 6)
    part = store.keys
    flipped = {**part.data, "outlier_index": part.data["outlier_index"].long().flip(-1).contiguous()}
    store = dataclasses.replace(store, keys=dataclasses.replace(part, data=flipped))
    buf = kv(1, 2, 2, 64, torch.float16, 1, "key")
    with pytest.raises(AssertionError, match="sorted ascending"):
        ta.decode_attention_triton(kv(1, 4, 1, 64, torch.float16, 2, "value"), store, buf, buf, 0.125)


def test_resolve_kernel():
    assert resolve_kernel("torch", "cuda") == "torch"
    assert resolve_kernel("auto", "cpu") == "torch"
    assert resolve_kernel("triton", "cpu") == "triton"
    if torch.cuda.is_available():
        assert resolve_kernel("auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="kernel="):
        resolve_kernel("cuda", "cpu")


# ---------------------------------------------------------------- launches on the tensors' device
#
# Triton launches on the current CUDA device, not the tensors': with the layers of a model on
# several GPUs (parallelize=True) every launch must run under td.on_device(its tensors' device).


def test_on_device_makes_a_cuda_tensors_device_current(monkeypatch):
    entered = []

    class RecordingDevice:  # stands in for torch.cuda.device, which would need the GPU
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    second_gpu = torch.device("cuda", 1)  # a device object needs no GPU
    with td.on_device(second_gpu):
        assert entered == [second_gpu]
    assert entered == [second_gpu, "left"]
    with td.on_device(torch.device("cpu")):  # CPU tensors (the interpreter): nothing to switch
        pass
    assert entered == [second_gpu, "left"]


def launched_kernels(module) -> list[str]:
    """The Triton kernels `module` launches: its jit functions that the code indexes with a grid
    (the others are helpers that kernels call)."""
    from triton.runtime.jit import KernelInterface

    source = inspect.getsource(module)
    return [name for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and re.search(rf"\b{name}\[", source)]


def test_every_kernel_launches_under_the_guard_for_its_tensors_device(monkeypatch):
    guarded = []  # the devices td.on_device has made current, innermost last
    launches = {}

    @contextmanager
    def recording_guard(device):
        guarded.append(device)
        yield
        guarded.pop()

    def checked(name, kernel):
        class Launch:  # kernel[grid](*args): the grid first, then the launch
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    devices = {a.device for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)}
                    assert guarded and devices == {guarded[-1]}, f"{name} launched on {devices} under {guarded}"
                    launches[name] = launches.get(name, 0) + 1
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launch()

    monkeypatch.setattr(td, "on_device", recording_guard)
    kernels = {(module, name) for module in (tq, ta) for name in launched_kernels(module)}
    assert {name for _, name in kernels} == {"_group_stats_kernel", "_pack_kernel", "_attend_kernel", "_merge_kernel"}
    for module, name in kernels:
        monkeypatch.setattr(module, name, checked(name, getattr(module, name)))

    config = GearConfig(method="gear", bits=2, group_size=16, buffer_size=16, kernel="triton")
    store = make_store(config, 2, 2, 32, torch.float16, (20, 9), 1, 3, compressor=dispatch.compress)
    buf = kv(2, 2, 3, 32, torch.float16, 1, "key")
    ta.decode_attention_triton(kv(2, 4, 1, 32, torch.float16, 2, "value"), store, buf, buf, 0.2)
    assert set(launches) == {name for _, name in kernels}
    assert guarded == []


# ---------------------------------------------------------------- the torch reference itself

def naive_attention(q, store, k_buf, v_buf, scale, rows_k, rows_v, chunks_k, chunks_v, sinks=None):
    """decompress() every chunk, repeat K/V per query head, one row at a time, explicit masks;
    sinks: each row's exact (1, H, n, D) keys and values ahead of its prompt, or None."""
    batch, q_heads, q_len, dim = q.shape
    outs = []
    for b in range(batch):
        ks = [decompress(rows_k[b])[0].float()] if rows_k and rows_k[b] is not None else []
        vs = [decompress(rows_v[b])[0].float()] if rows_v and rows_v[b] is not None else []
        if sinks is not None:
            ks.insert(0, sinks[0][b][0].float())
            vs.insert(0, sinks[1][b][0].float())
        ks += [decompress(c)[b].float() for c in chunks_k]
        vs += [decompress(c)[b].float() for c in chunks_v]
        ks.append(k_buf[b].float())
        vs.append(v_buf[b].float())
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)
        n = k.shape[1]
        ratio = q_heads // k.shape[0]
        k, v = k.repeat_interleave(ratio, 0), v.repeat_interleave(ratio, 0)
        mask = torch.ones(q_len, n, dtype=torch.bool, device=q.device).tril(n - q_len)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b].float(), k, v, attn_mask=mask, scale=scale))
    return torch.stack(outs)


@pytest.mark.parametrize("block_tokens", [None, 1, 5, 16])  # one block; blocks across sinks, rows and chunks
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("q_len", [1, 3])
def test_torch_reference_is_attention_over_the_decompressed_cache(q_len, with_sinks, block_tokens):
    config = GearConfig(method="gear", bits=4, group_size=8, buffer_size=8)
    gen = lambda n, seed, kind: kv(1, 2, n, 16, torch.float32, seed, kind)  # noqa: E731
    rows_k = [gen(9, 1, "key"), None, gen(20, 2, "key")]
    rows_v = [gen(9, 3, "value"), None, gen(20, 4, "value")]
    rows_k = [None if x is None else compress_torch(x, config, "key") for x in rows_k]
    rows_v = [None if x is None else compress_torch(x, config, "value") for x in rows_v]
    chunks_k = [compress_torch(kv(3, 2, 8, 16, torch.float32, 10 + i, "key"), config, "key", 2) for i in range(2)]
    chunks_v = [compress_torch(kv(3, 2, 8, 16, torch.float32, 20 + i, "value"), config, "value", 2) for i in range(2)]
    sinks = None  # the second row: sinks only
    if with_sinks:
        sinks = tuple([kv(1, 2, n, 16, torch.float32, 30 + b + 5 * side, kind) for b, n in enumerate((2, 3, 1))]
                      for side, kind in enumerate(("key", "value")))
    store = KVStore(batch=3, prompt_end=21 if with_sinks else 20).with_prompt(
        rows_k, rows_v, SinkPart.from_rows(*sinks) if with_sinks else None)
    for k, v in zip(chunks_k, chunks_v):
        store = store.appended(k, v)
    k_buf = kv(3, 2, 4, 16, torch.float32, 1, "key")
    v_buf = kv(3, 2, 4, 16, torch.float32, 2, "value")
    q = kv(3, 6, q_len, 16, torch.float32, 3, "value")
    ours = decode_attention_torch(q, store, k_buf, v_buf, 0.3, block_tokens)
    want = naive_attention(q, store, k_buf, v_buf, 0.3, rows_k, rows_v, chunks_k, chunks_v, sinks)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,backbone,bits", compositions())
def test_every_composition_attends_alike_in_blocks(method, backbone, bits):
    """The packed torch path block by block = in one block, for each quantizer x corrections
    (blocks of 7 tokens cut rows, groups, chunks and outlier buckets anywhere), and the store
    holds its block plan once."""
    config = GearConfig(method=method, backbone=backbone, bits=bits, buffer_size=16)
    store = make_store(config, 2, 2, 64, torch.float32, (37, 20), 2, 11)
    k_buf, v_buf = kv(2, 2, 3, 64, torch.float32, 1, "key"), kv(2, 2, 3, 64, torch.float32, 2, "value")
    q = kv(2, 4, 1, 64, torch.float32, 3, "value")
    whole = decode_attention_torch(q, store, k_buf, v_buf, 0.125, block_tokens=10**6)
    blocked = decode_attention_torch(q, store, k_buf, v_buf, 0.125, block_tokens=7)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)
    plan = block_plan(store, 7)
    assert plan.blocks == 10 and block_plan(store, 7) is plan  # 69 tokens in row 0
    assert (plan.outliers is not None) == ("outlier_index" in store.keys.data)
    for j, part in enumerate((store.keys, store.values)):
        rebuilt = part.rebuilt()
        for first in range(0, len(plan.order), 7):  # any subset of tokens rebuilds as they do in the whole
            tokens = plan.order[first:first + 7]
            assert torch.equal(part.rebuilt(tokens), rebuilt[:, tokens])
        for i in range(plan.blocks):  # a block with only its own outliers looked at: the same
            tokens = plan.order[plan.bounds[i]:plan.bounds[i + 1]]
            entries = None if plan.outliers is None else plan.outliers[j][i]
            assert torch.equal(part.rebuilt(tokens, entries), rebuilt[:, tokens])
        if plan.outliers is not None:  # every outlier in exactly one block
            held = torch.cat([e[e >= 0] for e in plan.outliers[j]])
            assert sorted(held.tolist()) == sorted(torch.arange(part.data["outlier_index"].shape[1]).repeat(
                part.data["outlier_index"].shape[0]).tolist())


@pytest.mark.parametrize("fn", [decode_attention_torch, ta.decode_attention_triton])
def test_bad_calls_are_refused(fn):
    config = GearConfig(method="kivi", bits=2, group_size=8, buffer_size=8)
    store = make_store(config, 2, 2, 16, torch.float16, (8, 5), 1, 1)
    buf = kv(2, 2, 2, 16, torch.float16, 1, "key")
    q = kv(2, 4, 1, 16, torch.float16, 2, "key")
    fn(q, store, buf, buf, 0.25)  # fine
    with pytest.raises(ValueError, match="multiple"):
        fn(kv(2, 3, 1, 16, torch.float16, 2, "key"), store, buf, buf, 0.25)
    with pytest.raises(ValueError, match="does not fit"):
        fn(q.float(), store, buf.float(), buf.float(), 0.25)
    with pytest.raises(ValueError, match="batch of 2"):
        fn(q[:1], store, buf[:1], buf[:1], 0.25)
    with pytest.raises(ValueError, match="own tokens in the buffer"):
        fn(kv(2, 4, 3, 16, torch.float16, 2, "key"), store, buf, buf, 0.25)
    with pytest.raises(TypeError, match="KVStore"):
        fn(q, [store], buf, buf, 0.25)
    with pytest.raises(ValueError, match="nothing to attend to"):
        fn(q, None, None, None, 0.25)
    dropped = make_store(config, 2, 2, 16, torch.float16, (8, 5), 1, 1).without_prompt()
    with pytest.raises(ValueError, match="dropped tokens"):
        fn(q, dropped, buf, buf, 0.25)
