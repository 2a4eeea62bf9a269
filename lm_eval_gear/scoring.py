"""Loglikelihood requests scored through a GEAR cache, each token as if the model had generated it.

A request (context, continuation) is cut to the model's length as HFLM cuts it (a
:class:`Window`): its prompt, what is left of the context, is prefilled with exact attention and
then compressed; the rest is fed through the compressed cache in pieces that end on the cache's
buffer flushes (``forcing.buffer_pieces``), so every token sees the cache as in generation. The
first continuation token is scored by the exact prefill, as the first generated token is.

* :func:`score_one`: one request, one cache: the reference that the tests hold the batched path to;
* :func:`score_batch`: a batch of requests, one cache: each distinct prompt is prefilled alone
  and compressed once (into the batch's cache, left-padded), its rows repeated for the requests
  that share it, and all the continuations fed together, right-padded;
* :func:`sharing_collator`: lm-eval's Collator, ordering the requests so that those of one prompt
  (the choices of a multiple-choice doc) land in the same batch.

Right padding is safe: a real token attends only to its row's earlier tokens, all real, so the
pad tokens that get compressed into a row's later chunks are only ever attended to by pads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.models.utils import Collator
from transformers import DynamicCache

from .compat import cache_kwarg, last_logits_kwargs
from .forcing import buffer_pieces, forward_with_cache

Answer = tuple[float, bool]  # (log P(continuation | context), whether every token is the argmax)


@dataclass(frozen=True)
class Window:
    """One request as scored: `tokens` are the last max_length + 1 of context + continuation."""

    tokens: tuple[int, ...]
    prompt_len: int  # what is left of the context, at least one token

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.tokens[: self.prompt_len]

    @property
    def stream(self) -> tuple[int, ...]:
        """Fed after the prompt (the last token is only predicted)."""
        return self.tokens[self.prompt_len : -1]

    @property
    def targets(self) -> tuple[int, ...]:
        """The scored tokens, each predicted by the position before it."""
        return self.tokens[self.prompt_len :]


def window(context: list[int], continuation: list[int], max_length: int) -> Window:
    """Truncated on the left as HFLM truncates: the continuation is scored whole when it fits."""
    whole = (context + continuation)[-(max_length + 1) :]
    return Window(tuple(whole), max(1, len(whole) - len(continuation)))


def sharing_collator(requests: list, max_length: int) -> Collator:
    """lm-eval's Collator over (request_str, context, continuation) requests, sorted as HFLM sorts
    them (longest first, so that a batch's first request is its longest, as batch_size=auto
    assumes) except that the requests sharing a prompt stay next to each other."""
    windows = {id(r): window(r[1], r[2], max_length) for r in requests}
    longest: dict[tuple[int, ...], int] = {}
    for w in windows.values():
        longest[w.prompt] = max(longest.get(w.prompt, 0), len(w.tokens))

    def key(request):
        w = windows[id(request)]
        return -longest[w.prompt], w.prompt, -len(w.tokens), w.tokens

    return Collator(requests, sort_fn=key)


def token_scores(logits: torch.Tensor, targets: torch.Tensor, softmax_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, n, vocab), targets (rows, n) -> log P(target) (rows, n), target is the argmax (rows, n)."""
    logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    return logprobs.gather(-1, targets[..., None])[..., 0], logprobs.argmax(dim=-1) == targets


def _answer(logprobs: torch.Tensor, hits: torch.Tensor) -> Answer:
    return float(logprobs.sum()), bool(hits.all())


@torch.no_grad()
def score_one(model, w: Window, make_cache: Callable, softmax_dtype=None) -> Answer:
    """One request through a fresh cache of its own, make_cache(None)."""
    device = model.device
    logits = forward_with_cache(model, torch.tensor([w.tokens[:-1]], device=device), make_cache(None), w.prompt_len)
    targets = torch.tensor([w.targets], device=device)
    logprobs, hits = token_scores(logits[:, w.prompt_len - 1 :], targets, softmax_dtype)  # (1, scored)
    return _answer(logprobs[0], hits[0])


def _padded(rows: list[tuple[int, ...]], side: str, pad_token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ids and 0/1 mask, both (len(rows), longest), padded on `side` with pad_token."""
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad_token, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, span] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(rows, tokens) mask -> position ids: a row's real tokens count from 0, as they would alone;
    left pads take 0 and right pads their row's last (within the model's positions)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def _prefill_alone(model, prompts: list[tuple[int, ...]], width: int):
    """Each prompt through the model alone -> its next-token logits (prompts, 1, vocab) and, per
    layer, the prompts' keys and values left-padded with zeros to `width` tokens,
    ((prompts, kv_heads, width, head_dim), same)."""
    logits, layers = [], None
    for prompt in prompts:
        exact = DynamicCache(config=model.config)
        ids = torch.tensor([prompt], device=model.device)
        logits.append(model(ids, use_cache=True, **{cache_kwarg(model): exact}, **last_logits_kwargs(model)).logits[:, -1:])
        if layers is None:
            layers = [tuple(t.new_zeros(len(prompts), t.shape[1], width, t.shape[3]) for t in (layer.keys, layer.values))
                      for layer in exact.layers]
        row = len(logits) - 1
        for (keys, values), layer in zip(layers, exact.layers):
            keys[row, :, width - len(prompt) :], values[row, :, width - len(prompt) :] = layer.keys[0], layer.values[0]
    return torch.cat(logits), layers


@torch.no_grad()
def score_batch(model, windows: list[Window], make_cache: Callable, softmax_dtype=None,
                pad_token: int = 0) -> tuple[list[Answer], object]:
    """Requests through one cache -> (their answers, the cache); make_cache(prompt attention mask).
    What the pads hold changes no answer (the tests vary pad_token to check)."""
    device = model.device
    prompts = list(dict.fromkeys(w.prompt for w in windows))  # distinct, in order of first use
    index = {p: i for i, p in enumerate(prompts)}
    rows = torch.tensor([index[w.prompt] for w in windows], device=device)  # (rows,) -> its prompt
    _, prompt_mask = _padded(prompts, "left", pad_token, device)  # (prompts, P)
    width = prompt_mask.shape[1]
    cache = make_cache(prompt_mask)
    arg = {cache_kwarg(model): cache}
    # the prefill: each distinct prompt alone with exact attention, so that its keys and values,
    # and so what the cache compresses of it, are bitwise those of scoring it alone (in one
    # padded batch, the model's matrix products round a row's keys otherwise, and a code can
    # land one step away); the cache then compresses them as a left-padded batch
    logits, layers = _prefill_alone(model, prompts, width)
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    first = logits[rows]  # (rows, 1, vocab)
    cache.batch_select_indices(rows)  # one row per request from here on

    stream, stream_mask = _padded([w.stream for w in windows], "right", pad_token, device)  # (rows, L)
    targets, _ = _padded([w.targets for w in windows], "right", 0, device)  # (rows, L + 1)
    mask = torch.cat([prompt_mask[rows], stream_mask], dim=1)  # (rows, P + L): the whole padded batch
    positions = _positions(mask)
    scores = [token_scores(first, targets[:, :1], softmax_dtype)]
    start = width  # stream token t is column start + t of the padded batch
    for a, b in buffer_pieces(start, start + stream.shape[1], start, cache.config.buffer_size):
        logits = model(stream[:, a - start : b - start], attention_mask=mask[:, :b], position_ids=positions[:, a:b],
                       use_cache=True, **arg).logits  # (rows, b - a, vocab)
        scores.append(token_scores(logits, targets[:, a - start + 1 : b - start + 1], softmax_dtype))
    logprobs, hits = (torch.cat(parts, dim=1) for parts in zip(*scores))  # (rows, L + 1)
    answers = [_answer(logprobs[i, : len(w.targets)], hits[i, : len(w.targets)]) for i, w in enumerate(windows)]
    return answers, cache
