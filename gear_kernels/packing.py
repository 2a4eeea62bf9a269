"""Dense bit packing of quantization codes.

2, 4 and 8 bit codes pack into bytes (4, 2 and 1 codes a byte); 3 bit codes pack ten to a
32-bit word (30 bits used), the densest layout that keeps every code inside one word.
Codes are packed along the last axis, code i of a row at word i // per_word, bit offset
(i % per_word) * bits.
"""

from __future__ import annotations

import math

import torch

CODES_PER_WORD = {2: 4, 3: 10, 4: 2, 8: 1}
WORD_DTYPE = {2: torch.uint8, 3: torch.int32, 4: torch.uint8, 8: torch.uint8}


def packed_length(n: int, bits: int) -> int:
    """Words needed for n codes."""
    return math.ceil(n / CODES_PER_WORD[bits])


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(CODES_PER_WORD[bits], device=device, dtype=torch.int64) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., packed_length(n, bits)) words."""
    assert bits in CODES_PER_WORD, f"bits must be one of {sorted(CODES_PER_WORD)}, got {bits}"
    per_word = CODES_PER_WORD[bits]
    n = codes.shape[-1]
    pad = packed_length(n, bits) * per_word - n
    wide = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    wide = wide.reshape(*codes.shape[:-1], -1, per_word)  # (..., words, per_word)
    words = (wide << _shifts(bits, codes.device)).sum(dim=-1)  # disjoint bit fields: sum == or
    return words.to(WORD_DTYPE[bits])


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(..., words) -> (..., n) codes as uint8."""
    assert words.dtype == WORD_DTYPE[bits], f"{bits}-bit codes are stored as {WORD_DTYPE[bits]}"
    wide = words.to(torch.int32).unsqueeze(-1) >> _shifts(bits, words.device).to(torch.int32)  # (..., words, per_word)
    codes = (wide & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    return codes[..., :n].to(torch.uint8)
