"""Scoring given tokens through a compressed cache, as if the model had generated them."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .compat import cache_kwarg


def buffer_pieces(start: int, stop: int, prompt_len: int, buffer_size: int) -> list[tuple[int, int]]:
    """Split positions [start, stop) into pieces that end on the cache's buffer boundaries.

    Tokens after the prompt flush every `buffer_size` tokens; a piece never crosses a flush, so
    within a piece every token sees exactly what it would see if generated one at a time.
    """
    pieces = []
    while start < stop:
        end = min(stop, prompt_len + ((start - prompt_len) // buffer_size + 1) * buffer_size)
        pieces.append((start, end))
        start = end
    return pieces


@torch.no_grad()
def forward_with_cache(model, input_ids: torch.Tensor, cache: Cache, prompt_len: int,
                       buffer_size: int | None = None) -> torch.Tensor:
    """input_ids (1, T) -> logits (1, T, vocab).

    The first prompt_len tokens are the prompt (exact attention, then compressed); the rest
    are fed in buffer-aligned pieces, so each sees the compressed cache as during generation.
    buffer_size defaults to the GearCache's; give it to run an exact cache through the same pieces.
    """
    assert input_ids.shape[0] == 1, "forward_with_cache scores one sequence at a time"
    assert 1 <= prompt_len <= input_ids.shape[1], f"prompt_len {prompt_len} outside 1..{input_ids.shape[1]}"
    size = cache.config.buffer_size if buffer_size is None else buffer_size
    pieces = [(0, prompt_len)] + buffer_pieces(prompt_len, input_ids.shape[1], prompt_len, size)
    cache_arg = {cache_kwarg(model): cache}
    logits = [model(input_ids[:, a:b], use_cache=True, **cache_arg).logits for a, b in pieces]
    return torch.cat(logits, dim=1)
