"""Loglikelihood requests scored through a GEAR cache, each token as if the model had generated it.

A request (context, continuation) is cut to the model's length as HFLM cuts it (a
:class:`Window`): its prompt, what is left of the context, is prefilled with exact attention and
then compressed; the rest is fed through the compressed cache so that every token sees the cache
as in generation: on the rebuilt path many tokens a forward (``GearCache.fed_at_once``: each token
attends to the chunks compressed before its own and to its own chunk exactly), else in pieces
that end on the cache's buffer flushes (``forcing.buffer_pieces``). The first continuation token
is scored by the exact prefill, as the first generated token is.

* :func:`score_one`: one request, one cache: the reference that the tests hold the batched path to;
* :func:`score_requests`: many requests: each distinct prompt is prefilled alone and compressed
  once (``prefill.prefill_alone``), then each request's continuation is fed alone through its own
  fork of that cache. Every tensor a request computes has the shape it has alone, so the answers
  are bitwise those of one request at a time, whatever lm-eval's batch size (in a padded batch a
  row would be rounded otherwise, and a 2-bit code turns an ulp into a step); what requests share
  is their prompt (the choices of a multiple-choice doc), prefilled and compressed once;
* :func:`sharing_order`: an order of the requests in which those of one prompt come together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .compat import cache_kwarg, last_logits_kwargs
from .forcing import buffer_pieces
from .prefill import fill, prefill_alone

Answer = tuple[float, bool]  # (log P(continuation | context), whether every token is the argmax)
# Tokens fed in one forward (GearCache.fed_at_once), rounded down to whole buffers: a longer
# continuation goes in pieces of this many, which bounds the mask (piece x keys) and the attention
# a piece computes beyond the causal part (its compressed and exact copies of its own tokens).
AT_ONCE_TOKENS = 512


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


def sharing_order(windows: list[Window]) -> list[int]:
    """The windows' indices with those of one prompt one after the other, the prompt of the
    longest window first (as HFLM orders requests: a memory problem shows at once)."""
    longest: dict[tuple[int, ...], int] = {}
    for w in windows:
        longest[w.prompt] = max(longest.get(w.prompt, 0), len(w.tokens))
    return sorted(range(len(windows)), key=lambda i: (-longest[windows[i].prompt], windows[i].prompt,
                                                      -len(windows[i].tokens), windows[i].tokens))


def token_scores(logits: torch.Tensor, targets: torch.Tensor, softmax_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, n, vocab), targets (rows, n) -> log P(target) (rows, n), target is the argmax (rows, n)."""
    logprobs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
    return logprobs.gather(-1, targets[..., None])[..., 0], logprobs.argmax(dim=-1) == targets


def _answer(logprobs: torch.Tensor, hits: torch.Tensor) -> Answer:
    return float(logprobs.sum()), bool(hits.all())


@torch.no_grad()
def score_one(model, w: Window, make_cache: Callable, softmax_dtype=None) -> Answer:
    """One request through a fresh cache of its own, make_cache(None), prefilled by the model."""
    cache = make_cache(None)
    prompt = torch.tensor([w.prompt], device=model.device)
    first = model(prompt, use_cache=True, **{cache_kwarg(model): cache}, **last_logits_kwargs(model)).logits[:, -1:]
    return _continued(model, w, cache, first, softmax_dtype)


@torch.no_grad()
def score_requests(model, windows: Iterable[Window], make_cache: Callable, softmax_dtype=None
                   ) -> Iterator[tuple[Answer, dict]]:
    """Requests, one at a time -> (its answer, the memory report of its cache) for each, in order;
    make_cache(None) a fresh cache. One prompt's compressed cache is kept at a time: give the
    requests of a prompt one after the other (as sharing_order orders them)."""
    held: tuple[tuple[int, ...], torch.Tensor, object] | None = None  # prompt, its first logits, its cache
    for w in windows:
        if held is None or held[0] != w.prompt:
            first, layers = prefill_alone(model, w.prompt)
            cache = make_cache(None)
            fill(cache, layers)
            held = w.prompt, first, cache
        _, first, cache = held
        cache = cache.fork()
        yield _continued(model, w, cache, first, softmax_dtype), cache.memory_report()


def _continued(model, w: Window, cache, first: torch.Tensor, softmax_dtype) -> Answer:
    """A request whose prompt `cache` holds and whose first target `first` (1, 1, vocab) predicts:
    the rest fed in buffer-aligned pieces, each token scored by the position before it."""
    stream = torch.tensor([w.stream], device=model.device)  # (1, L)
    arg = {cache_kwarg(model): cache}
    size = cache.config.buffer_size
    logits = [first]
    if cache.can_feed_at_once():
        for a, b in buffer_pieces(0, stream.shape[1], 0, size * max(1, AT_ONCE_TOKENS // size)):
            with cache.fed_at_once(b - a) as mask:
                logits.append(model(stream[:, a:b], attention_mask=mask, use_cache=True, **arg).logits)
    else:
        logits += [model(stream[:, a:b], use_cache=True, **arg).logits for a, b in buffer_pieces(0, stream.shape[1], 0, size)]
    targets = torch.tensor([w.targets], device=model.device)
    logprobs, hits = token_scores(torch.cat(logits, dim=1), targets, softmax_dtype)  # (1, L + 1)
    return _answer(logprobs[0], hits[0])
