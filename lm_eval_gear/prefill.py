"""Each prompt prefilled alone, so that what a GEAR cache compresses of it is the same in any batch.

Inside a padded batch the model computes a row's keys and values with other rounding than alone
(its matrix products and its attention see other shapes), and a 2-bit code turns such an ulp into
a whole quantization step. So every compressed request type prefills each distinct prompt alone,
with exact attention, and hands its keys and values to the GEAR cache: the compressed prompt, and
the logits of the first token after it, are then bitwise those of the prompt alone.

* :func:`prefill_alone`: one prompt through the model alone -> its last logits and its keys and
  values, every token of every layer (a sliding-window layer's too: the GEAR cache drops what the
  window cannot see, as it does after any prefill);
* :func:`fill`: such keys and values handed to an empty cache, which compresses them;
* :func:`prompts_prefilled_alone`: ``model.generate()`` with its prefill done so, for a padded batch.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from transformers import DynamicCache

from .cache import left_padding
from .compat import cache_kwarg, last_logits_kwargs

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values (batch, kv_heads, tokens, head_dim)
CACHE_KWARGS = ("cache", "past_key_values")  # what transformers releases call the forward's cache argument


@torch.no_grad()
def _prefill_output(model, prompt: Sequence[int]):
    """(the model's output, the exact cache it filled) for one prompt alone; a DynamicCache
    without a config, whose layers all keep every token."""
    exact = DynamicCache()
    ids = torch.tensor([list(prompt)], device=model.device)
    out = model(ids, use_cache=True, **{cache_kwarg(model): exact}, **last_logits_kwargs(model))
    return out, exact


def prefill_alone(model, prompt: Sequence[int]) -> tuple[torch.Tensor, KV]:
    """One prompt -> its next-token logits (1, 1, vocab) and, per layer, its keys and values
    (1, kv_heads, tokens, head_dim)."""
    out, exact = _prefill_output(model, prompt)
    return out.logits[:, -1:], [(layer.keys, layer.values) for layer in exact.layers]


def fill(cache, layers: KV, position_ids: torch.Tensor | None = None) -> None:
    """Hand a prompt's exact keys and values to an empty cache, which compresses them as after a
    prefill; position_ids (batch, tokens): a left-padded batch's, for a cache not told its mask."""
    extra = () if position_ids is None else ({"position_ids": position_ids},)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index, *extra)


def left_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """(1, heads, n_i, dim) tensors -> (len(rows), heads, width, dim), each row at the end, zeros before."""
    first = rows[0]
    out = first.new_zeros(len(rows), first.shape[1], width, first.shape[3])
    for i, row in enumerate(rows):
        out[i, :, width - row.shape[2] :] = row[0]
    return out


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) left-padding mask -> position ids: a row's tokens count from 0, as alone."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@contextmanager
def prompts_prefilled_alone(model, cache) -> Iterator[None]:
    """Within: the forward that prefills the empty `cache` (generate()'s first step) runs each
    distinct prompt of the left-padded batch alone, exactly, and hands their keys and values to
    `cache` as that batch; every other forward runs as usual.

        with prompts_prefilled_alone(model, cache):
            model.generate(input_ids, attention_mask=mask, cache=cache, ...)

    The prompts' compressed bytes and the first generated token's logits are then those of each
    prompt alone. The tokens generated after it are computed for the whole batch at once (that
    is what batching is for), whose matrix products round a row otherwise than alone.
    """
    inner = model.forward
    own = model.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) to put back

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        given = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if given is not cache or cache.get_seq_length() or args:
            return inner(*args, **kwargs)
        return _prefill_batch(model, cache, kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _prefill_batch(model, cache, kwargs: dict):
    """generate()'s prefill (its forward's keyword arguments) of a left-padded batch, each
    distinct prompt alone: the model's output with each row's last logits and `cache`, which
    now holds the batch's compressed prompts."""
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    asked = [k for k in ("inputs_embeds", "output_attentions", "output_hidden_states")
             if kwargs.get(k) is not None and kwargs.get(k) is not False]
    if input_ids is None or asked:
        raise ValueError(
            f"prefilling prompts alone needs input_ids and returns logits only; got {asked or ['no input_ids']}: "
            "pass input_ids, or generate without lm_eval_gear.prompts_prefilled_alone"
        )
    batch, width = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pads = left_padding(mask).tolist()
    rows = [tuple(input_ids[b, pads[b] :].tolist()) for b in range(batch)]
    distinct = list(dict.fromkeys(rows))
    outputs = [_prefill_output(model, prompt) for prompt in distinct]
    index = [distinct.index(row) for row in rows]
    exacts = [outputs[i][1] for i in index]  # each row's prompt, alone
    layers = [(left_padded([c.layers[n].keys for c in exacts], width), left_padded([c.layers[n].values for c in exacts], width))
              for n in range(len(exacts[0].layers))]
    fill(cache, layers, padded_positions(mask))
    out, exact = outputs[0]
    out.logits = torch.cat([outputs[i][0].logits[:, -1:] for i in index])  # (batch, 1, vocab)
    for key, value in list(out.items()):
        if value is exact:
            out[key] = cache
    return out
