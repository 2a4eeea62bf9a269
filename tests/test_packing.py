"""Dense packing of codes, and groupwise min-max quantization, on their own."""

from __future__ import annotations

import math

import pytest
import torch

from gear_kernels.packing import BYTES_PER_WORD, CODES_PER_WORD, pack, packed_length, unpack
from gear_kernels.quantize import dequantize, levels, quantize

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
def test_every_code_value_in_every_slot_round_trips(bits):
    # Row r holds codes (i + r) mod 2^bits: over lcm(codes a word, 2^bits) positions every value
    # sits in every slot of a word; one more code leaves a partial last word.
    top = 1 << bits
    n = math.lcm(CODES_PER_WORD[bits], top) + 1
    rows = ((torch.arange(n) + torch.arange(top)[:, None]) % top).to(torch.uint8)  # (2^bits, n)
    packed = pack(rows, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (top, packed_length(n, bits))
    assert torch.equal(unpack(packed, bits, n), rows)


@pytest.mark.parametrize("bits, per_byte", [(2, 4), (3, 8 / 3), (4, 2), (8, 1)])
def test_density(bits, per_byte):
    """No bit wasted when a row fills its words: 3-bit codes go 8 to 3 bytes."""
    codes = torch.zeros(2, 5, 1000, dtype=torch.uint8)
    assert pack(codes, bits).shape == (2, 5, round(1000 / per_byte))
    assert packed_length(1001, bits) == (1000 // CODES_PER_WORD[bits] + 1) * BYTES_PER_WORD[bits]


@pytest.mark.parametrize("bits, codes, octets", [
    (2, [1, 2, 3, 0], [0b00111001]), (4, [0xA, 0x5], [0x5A]),
    # eight 3-bit codes 0..7: the 24-bit word 0o76543210, low byte first
    (3, list(range(8)), [0o76543210 & 0xFF, (0o76543210 >> 8) & 0xFF, 0o76543210 >> 16]),
])
def test_layout_first_code_in_lowest_bits(bits, codes, octets):
    assert pack(torch.tensor(codes, dtype=torch.uint8), bits).tolist() == octets


def test_each_row_starts_on_its_own_byte():
    """A token's codes never share a byte with the next token's, whatever the row length."""
    rows = torch.randint(0, 8, (3, 13), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack(rows, 3)
    assert packed.shape == (3, 6)  # 13 codes: two 3-byte words
    for r in range(3):
        assert torch.equal(pack(rows[r : r + 1], 3), packed[r : r + 1])


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
