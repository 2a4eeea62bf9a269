"""Dense bit packing of quantization codes, a token's codes to a row of bytes.

Codes are packed along the last axis (a token's head_dim codes) into little-endian words of
CODES_PER_WORD[bits] codes, code j of a word at bit offset j * bits:

- 2, 4 and 8 bits: 4, 2 and 1 codes a byte;
- 3 bits: 8 codes in a 3-byte word (24 bits, none wasted), stored as its 3 bytes, low first.

A row of n codes takes packed_length(n, bits) bytes (the last word partly filled when n is not
a multiple of the codes a word), so every token starts on a byte of its own: a cache can hold
tokens of different chunks side by side and address one by (token, byte).
"""

from __future__ import annotations

import math

import torch

CODES_PER_WORD = {2: 4, 3: 8, 4: 2, 8: 1}
BYTES_PER_WORD = {2: 1, 3: 3, 4: 1, 8: 1}


def packed_length(n: int, bits: int) -> int:
    """Bytes for a row of n codes."""
    return math.ceil(n / CODES_PER_WORD[bits]) * BYTES_PER_WORD[bits]


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(CODES_PER_WORD[bits], device=device, dtype=torch.int64) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2^bits) -> (..., packed_length(n, bits)) uint8."""
    assert bits in CODES_PER_WORD, f"bits must be one of {sorted(CODES_PER_WORD)}, got {bits}"
    per_word, word_bytes = CODES_PER_WORD[bits], BYTES_PER_WORD[bits]
    n = codes.shape[-1]
    pad = math.ceil(n / per_word) * per_word - n
    wide = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
    wide = wide.reshape(*codes.shape[:-1], -1, per_word)  # (..., words, per_word)
    words = (wide << _shifts(bits, codes.device)).sum(dim=-1, keepdim=True)  # disjoint bit fields: sum == or
    octets = (words >> (8 * torch.arange(word_bytes, device=codes.device))) & 0xFF  # (..., words, word_bytes)
    return octets.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(..., bytes) -> (..., n) codes as uint8."""
    assert packed.dtype == torch.uint8, f"packed codes are uint8, got {packed.dtype}"
    word_bytes = BYTES_PER_WORD[bits]
    if word_bytes == 1:  # byte-sized words: shift and mask in uint8, the cheapest on a CPU
        shifts = _shifts(bits, packed.device).to(torch.uint8)
        wide = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., words, per_word)
    else:
        octets = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, word_bytes)
        words = octets[..., 0] | (octets[..., 1] << 8) | (octets[..., 2] << 16)  # 3-byte words
        wide = (words.unsqueeze(-1) >> _shifts(bits, packed.device).to(torch.int32)) & ((1 << bits) - 1)
    return wide.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
