"""A prompt prefilled once, exactly, and handed to GEAR caches (scoring shares one context's
prefill among the requests that continue it).

* :func:`prefill_alone`: one prompt through the model alone -> its last logits and its keys and
  values, every token of every layer (a sliding-window layer's too: the GEAR cache drops what the
  window cannot see, as it does after any prefill);
* :func:`fill`: such keys and values handed to an empty cache, which compresses them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from .compat import cache_kwarg, last_logits_kwargs

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values (batch, kv_heads, tokens, head_dim)


@torch.no_grad()
def prefill_alone(model, prompt: Sequence[int]) -> tuple[torch.Tensor, KV]:
    """One prompt -> its next-token logits (1, 1, vocab) and, per layer, its keys and values
    (1, kv_heads, tokens, head_dim): a DynamicCache without a config, whose layers all keep every token."""
    exact = DynamicCache()
    ids = torch.tensor([list(prompt)], device=model.device)
    out = model(ids, use_cache=True, **{cache_kwarg(model): exact}, **last_logits_kwargs(model))
    return out.logits[:, -1:], [(layer.keys, layer.values) for layer in exact.layers]


def fill(cache, layers: KV) -> None:
    """Hand a prompt's exact keys and values to an empty cache, which compresses them as after a
    prefill."""
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
