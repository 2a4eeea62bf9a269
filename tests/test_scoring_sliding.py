"""Scoring on models with sliding-window layers (Mistral with a window, Gemma-2, Gemma-3), with
contexts shorter and longer than the window: the prefill keeps every token for the cache, which
drops what the window cannot see, as after any prefill."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from gear_kernels import GearConfig
from lm_eval_gear import GearCache
from lm_eval_gear.scoring import score_one, score_requests, window
from tiny_models import VOCAB, tiny_model

WINDOW = 16
MODELS = {"mistral": dict(sliding_window=WINDOW), "gemma2": dict(sliding_window=WINDOW),
          "gemma3": dict(sliding_window=WINDOW)}
KIVI = GearConfig(method="kivi", bits=2, group_size=8, buffer_size=4)
EXACT = GearConfig(method="none", buffer_size=4)


def _requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Contexts of 5 to 40 tokens (the window is 16) and continuations of 1 to 11 (0 to 2 flushes)."""
    rng = random.Random(seed)
    return [([rng.randrange(1, VOCAB) for _ in range(n)], [rng.randrange(1, VOCAB) for _ in range(m)])
            for n, m in ((5, 3), (15, 11), (16, 1), (17, 6), (40, 9), (40, 2))]


def _full_forward(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from one forward over the whole sequence, no cache."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0, len(context) - 1 : -1].float(), dim=-1)
    return float(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compressed_scoring_is_one_at_a_time_on_sliding_windows(arch):
    model, config = tiny_model(arch, **MODELS[arch])
    assert any(layer.is_sliding for layer in GearCache(KIVI, config).layers)
    windows = [window(c, x, 2048) for c, x in _requests()]
    make = lambda mask: GearCache(KIVI, config, mask)  # noqa: E731
    got = [answer for answer, _ in score_requests(model, windows, make)]
    assert got == [score_one(model, w, make) for w in windows]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_scoring_through_an_exact_cache_is_a_full_forward(arch):
    """The path itself (prefill, then buffer-aligned pieces through the window) is exact: with
    method none's layers it gives what one forward over the whole sequence gives."""
    model, config = tiny_model(arch, **MODELS[arch])
    requests = _requests(1)
    answers = score_requests(model, [window(c, x, 2048) for c, x in requests], lambda mask: GearCache(EXACT, config, mask))
    for (context, continuation), ((logprob, _), _) in zip(requests, answers, strict=True):
        assert logprob == pytest.approx(_full_forward(model, context, continuation), abs=1e-4)
