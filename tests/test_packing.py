"""Dense packing of codes, and groupwise min-max quantization, on their own."""

from __future__ import annotations

import math

import pytest
import torch

from gear_kernels.packing import CODES_PER_WORD, WORD_DTYPE, pack, packed_length, unpack
from gear_kernels.quantize import dequantize, levels, quantize

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
def test_every_code_value_in_every_slot_round_trips(bits):
    # Row r holds codes (i + r) mod 2^bits: over lcm(codes a word, 2^bits) positions every value
    # sits in every slot of a word; one more code leaves a partial last word.
    top = 1 << bits
    n = math.lcm(CODES_PER_WORD[bits], top) + 1
    rows = ((torch.arange(n) + torch.arange(top)[:, None]) % top).to(torch.uint8)  # (2^bits, n)
    words = pack(rows, bits)
    assert words.dtype == WORD_DTYPE[bits]
    assert words.shape == (top, packed_length(n, bits))
    assert torch.equal(unpack(words, bits, n), rows)


@pytest.mark.parametrize("bits, dtype, per_word", [(2, torch.uint8, 4), (3, torch.int32, 10), (4, torch.uint8, 2),
                                                   (8, torch.uint8, 1)])
def test_density(bits, dtype, per_word):
    codes = torch.zeros(2, 5, 1000, dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == dtype and words.shape == (2, 5, -(-1000 // per_word))


@pytest.mark.parametrize("bits, codes, word", [(2, [1, 2, 3, 0], 0b00111001), (4, [0xA, 0x5], 0x5A),
                                               (3, [7] + [0] * 8 + [5], 7 | 5 << 27)])
def test_layout_first_code_in_lowest_bits(bits, codes, word):
    assert pack(torch.tensor(codes, dtype=torch.uint8), bits).tolist() == [word]


def test_three_bit_words_never_use_the_sign_bit():
    words = pack(torch.full((10,), 7, dtype=torch.uint8), 3)
    assert words.item() == (1 << 30) - 1


@pytest.mark.parametrize("bits", BITS)
def test_levels_are_two_to_the_bits_minus_one(bits):
    assert levels(bits) == 2**bits - 1


def _per_entry(per_group: torch.Tensor, group: int, length: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group, dim=-1)[..., :length]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [1, 7, 64])
@pytest.mark.parametrize("length", [1, 50, 64, 130])
def test_quantize_within_half_step_and_codes_in_range(bits, group, length):
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(length)) * 4  # (3, length)
    codes, scale, zero = quantize(x, None, bits, group)
    n_groups = -(-length // group)
    assert scale.shape == zero.shape == (3, n_groups) and scale.dtype == zero.dtype == torch.float16
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels(bits)
    error = (dequantize(codes, scale, zero, group) - x).abs()
    step = _per_entry(scale, group, length)
    assert (error <= step / 2 + 1e-6 * (x.abs() + 1)).all()


def test_quantize_uses_all_levels_of_a_group():
    # min maps to code 0 and max to the top code: the range is not wasted
    codes, _, _ = quantize(torch.linspace(-1, 3, 16).reshape(1, 16), None, 2, 16)
    assert codes[0, 0] == 0 and codes[0, -1] == 3


def test_excluded_entries_do_not_stretch_the_range():
    x = torch.tensor([[0.0, 1.0, 100.0, 0.5]])
    exclude = torch.tensor([[False, False, True, False]])
    _, scale, zero = quantize(x, exclude, 2, 4)
    assert scale.item() == pytest.approx(1 / 3, rel=1e-3) and zero.item() == 0


def test_fully_excluded_group_gets_zero_scale():
    x = torch.tensor([[5.0, 6.0, 1.0, 2.0]])
    _, scale, zero = quantize(x, torch.tensor([[True, True, False, False]]), 2, 2)
    assert scale[0, 0] == 0 and zero[0, 0] == 0 and torch.isfinite(scale).all()


def test_scale_and_zero_are_rounded_outward_in_fp16():
    # 0.1 is not an fp16 value: the zero must round down and the top level reach the max.
    x = torch.tensor([[0.1, 0.7]])
    _, scale, zero = quantize(x, None, 2, 2)
    assert zero.float().item() <= 0.1
    assert zero.float().item() + 3 * scale.float().item() >= 0.7


def test_beyond_fp16_range_is_refused():
    with pytest.raises(ValueError, match="fp16 range"):
        quantize(torch.tensor([[0.0, 1e6]]), None, 4, 2)
