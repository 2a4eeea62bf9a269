"""Triton kernels that quantize and pack one KV chunk: the uniform quantizers' (quantizers/uniform.py)
encode on a GPU, beside the torch reference they match bit for bit.

codes, scale, zero are bitwise identical to the reference (every layout and bit width). The
kernels repeat its arithmetic step by step: min/max over the group without the excluded
entries, zero = lo rounded down to fp16, scale = (hi - zero) / levels (IEEE division, div_rn)
rounded up to fp16, code = round-half-to-even(clamp((x - zero) / scale, 0, levels)) (IEEE
division; the rounding is done exactly on floor and fraction, so there is no tie-breaking
difference). Directed fp16 rounding is done on the bit pattern (round to nearest, then one ulp
toward -inf / +inf when the nearest lies on the wrong side), as torch.nextafter does.

Two kernels: `_group_stats_kernel` (scale and zero of every group) and `_pack_kernel` (codes
and packed words, one program per block of packed words; a token's codes are its own row of
bytes, 3-bit ones 8 to a 3-byte word).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .packing import BYTES_PER_WORD, CODES_PER_WORD, packed_length
from .quantize import FP16_MAX, levels
from . import triton_device as td
from .triton_device import pow2 as _pow2


@triton.jit
def _fp16_down(x):
    """fp32 -> fp16 rounded toward -inf (round to nearest, then one ulp down if above)."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    # one ulp toward -inf: positive -> pattern - 1; negative or -0 -> pattern + 1 (magnitude up);
    # +0 -> -smallest subnormal (0x8001)
    down = tl.where(bits > 0, bits - 1, tl.where(bits == 0, -32767, bits + 1))
    bits = tl.where(h.to(tl.float32) > x, down, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_up(x):
    """fp32 -> fp16 rounded toward +inf."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    # one ulp toward +inf: positive or +0 -> pattern + 1; -0 -> +smallest subnormal; negative -> - 1
    up = tl.where(bits >= 0, bits + 1, tl.where(bits == -32768, 1, bits - 1))
    bits = tl.where(h.to(tl.float32) < x, up, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _scale_zero(lo, hi, top):
    """Group min/max (lo = +inf for a group with no entries) -> fp16 scale and zero."""
    empty = lo == float("inf")
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    zero = _fp16_down(lo)
    scale = _fp16_up(tl.math.div_rn(hi - zero.to(tl.float32), top))
    return scale, zero


@triton.jit
def _round_code(steps, top):
    """round-half-to-even(clamp(steps, 0, top)), exactly (floor and fraction are exact here)."""
    s = tl.minimum(tl.maximum(steps, 0.0), top)
    f = tl.floor(s)
    frac = s - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))


@triton.jit
def _group_stats_kernel(
    x_ptr, ex_ptr, scale_ptr, zero_ptr,
    T, D, NG, G, top,
    PER_CHANNEL: tl.constexpr, HAS_EX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """scale/zero of every group of one (batch, head) slice x (T, D).

    PER_CHANNEL: groups of G consecutive tokens of one channel; grid (rows, NG, D blocks);
    scale (rows, D, NG). Else: groups of G consecutive channels of one token; grid
    (rows, token blocks); scale (rows, T, NG).
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * T * D
    if PER_CHANNEL:
        g = tl.program_id(1)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        lo = tl.full((BLOCK_D,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_D,), float("-inf"), tl.float32)
        t_stop = tl.minimum(g * G + G, T)
        for t0 in range(g * G, t_stop, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = (t < t_stop)[:, None] & d_ok[None, :]
            offs = base + t[:, None] * D + d[None, :]
            x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_EX:
                ok = ok & (tl.load(ex_ptr + offs, mask=ok, other=1) == 0)
            lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
        scale, zero = _scale_zero(lo, hi, top)
        out = row * D * NG + d * NG + g
        tl.store(scale_ptr + out, scale, mask=d_ok)
        tl.store(zero_ptr + out, zero, mask=d_ok)
    else:
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        ok = (t < T)[:, None] & (d < D)[None, :]
        offs = base + t[:, None] * D + d[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_EX:
            ok = ok & (tl.load(ex_ptr + offs, mask=ok, other=1) == 0)
        for g in range(0, NG):
            keep = ok & ((d >= g * G) & (d < g * G + G))[None, :]
            lo = tl.min(tl.where(keep, x, float("inf")), axis=1)
            hi = tl.max(tl.where(keep, x, float("-inf")), axis=1)
            scale, zero = _scale_zero(lo, hi, top)
            out = row * T * NG + t * NG + g
            tl.store(scale_ptr + out, scale, mask=t < T)
            tl.store(zero_ptr + out, zero, mask=t < T)


@triton.jit
def _pack_kernel(
    x_ptr, scale_ptr, zero_ptr, codes_ptr,
    T, D, NG, G, WPT, top,
    BITS: tl.constexpr, PW: tl.constexpr, PW_P2: tl.constexpr, WB: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Codes of a block of BLOCK_W packed words of one slice; grid (rows, word blocks).

    Token t holds WPT words (packing.py): word u holds the codes of channels u * PW + j
    (j < PW) at bit offset j * BITS, and is stored as its WB bytes, low first.
    """
    row = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # word index in the slice, (T, WPT) order
    j = tl.arange(0, PW_P2)
    t = w // WPT
    d = (w % WPT)[:, None] * PW + j[None, :]
    ok = (j < PW)[None, :] & (d < D) & (t < T)[:, None]
    i = t[:, None] * D + d  # flat position in the slice
    x = tl.load(x_ptr + row * T * D + i, mask=ok, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        g = row * D * NG + d * NG + t[:, None] // G
    else:
        g = row * T * NG + t[:, None] * NG + d // G
    scale = tl.load(scale_ptr + g, mask=ok, other=1.0).to(tl.float32)
    zero = tl.load(zero_ptr + g, mask=ok, other=0.0).to(tl.float32)
    safe = tl.where(scale > 0, scale, 1.0)  # a constant group has scale 0: code 0
    code = _round_code(tl.math.div_rn(x - zero, safe), top)
    word = tl.sum(tl.where(ok, code.to(tl.int32) << (j * BITS)[None, :], 0), axis=1)
    w_ok = w < T * WPT
    for byte in tl.static_range(WB):
        tl.store(codes_ptr + row * T * WPT * WB + w * WB + byte, ((word >> (8 * byte)) & 0xFF).to(tl.uint8), mask=w_ok)


POISON = False  # tests: fill every output with NaN (floats) or all ones (codes) before the kernels


def _new(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


@td.launches_on_input_device
def quantize_pack(
    x: torch.Tensor,
    exclude: torch.Tensor | None,
    bits: int,
    group: int,
    per_channel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, T, D) float -> codes (rows, T, bytes), scale, zero: (rows, D, NG) fp16 if
    per_channel else (rows, T, NG).

    exclude (rows, T, D) bool or None: entries left out of the min/max (outliers); they still
    get a code. Raises ValueError when a scale or zero overflows fp16 (as the reference).
    """
    assert x.dim() == 3 and x.is_contiguous(), "x must be a contiguous (rows, T, D) tensor"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    assert bits in CODES_PER_WORD, f"bits must be one of {sorted(CODES_PER_WORD)}"
    assert group >= 1, "group must be >= 1"
    rows, tokens, dim = x.shape
    assert rows >= 1 and tokens >= 1 and dim >= 1, f"empty input {tuple(x.shape)}"
    if exclude is not None:
        assert exclude.shape == x.shape and exclude.dtype == torch.bool, "exclude must be (rows, T, D) bool"
        assert exclude.device == x.device
        exclude = exclude.contiguous().view(torch.uint8)
    length = tokens if per_channel else dim
    n_groups = math.ceil(length / group)
    top = float(levels(bits))
    dev = x.device
    scale = _new((rows, dim if per_channel else tokens, n_groups), torch.float16, dev)
    zero = _new(scale.shape, torch.float16, dev)
    ex_arg = exclude if exclude is not None else x  # never read when HAS_EX is False
    td.check_device(x.device)
    small = td.interpreter_sizes(x.device)
    if per_channel:
        block_t = min(_pow2(min(group, tokens)), 256 if small else 64)
        block_d = _pow2(dim) if small else min(_pow2(dim), 64)
        grid = (rows, n_groups, triton.cdiv(dim, block_d))
    else:
        block_d = _pow2(dim)
        block_t = max(1, min(_pow2(tokens), (16384 if small else 4096) // block_d))
        grid = (rows, triton.cdiv(tokens, block_t))
    _group_stats_kernel[grid](
        x, ex_arg, scale, zero, tokens, dim, n_groups, group, top,
        PER_CHANNEL=per_channel, HAS_EX=exclude is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    per_word = CODES_PER_WORD[bits]
    words_per_token = math.ceil(dim / per_word)
    words = tokens * words_per_token
    codes = _new((rows, tokens, packed_length(dim, bits)), torch.uint8, dev)
    pw_p2 = _pow2(per_word)
    block_w = max(1, min(_pow2(words), (16384 if small else 1024) // pw_p2))
    _pack_kernel[(rows, triton.cdiv(words, block_w))](
        x, scale, zero, codes,
        tokens, dim, n_groups, group, words_per_token, top,
        BITS=bits, PW=per_word, PW_P2=pw_p2, WB=BYTES_PER_WORD[bits], PER_CHANNEL=per_channel, BLOCK_W=block_w,
    )
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise ValueError(
            f"values beyond the fp16 range (|x| > {FP16_MAX:.0f}) cannot be quantized with fp16 "
            "scales; use method=none for this model"
        )
    return codes, scale, zero
