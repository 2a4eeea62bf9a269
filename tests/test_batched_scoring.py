"""Compressed scoring (gear-hf's loglikelihood path) against one request at a time, bitwise.

The reference is ``scoring.score_one``: each request through a fresh cache of its own, prefilled
by the model. gear-hf's path (``score_requests``) prefills each distinct context alone, compresses
it once and feeds each continuation through its own fork of that cache: every tensor a request
computes has the shape it has alone, so the answers are exactly the reference's at every batch
size (in a padded batch the model would round a row otherwise, and a 2-bit code turns an ulp into
a whole step), on multiple choice and on rolling documents alike.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import pytest
from lm_eval import utils
from lm_eval.api.instance import Instance

from lm_eval_gear.model import GearHFLM
from lm_eval_gear.cache import GearCache, GearLayer
from lm_eval_gear.scoring import score_one, score_requests, window

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import WORDS, build_tiny_lm  # noqa: E402

SMALL = dict(buffer_size=4, group_size=8)  # continuations cross several buffer flushes
BATCH_SIZES = [1, 3, "auto"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


def _choices(seed: int = 0) -> list[tuple[None, list[int], list[int]]]:
    """5 docs x 4 choices: contexts of 3 to 250 tokens (250 + continuation is cut to the model's
    256 positions, differently for each choice), continuations of 1 to 19 tokens (up to four
    flushes at buffer_size 4); no token twice in a request."""
    rng = random.Random(seed)
    requests = []
    for length in (3, 17, 40, 60, 250):
        context = rng.sample(range(1, 300), length)
        rest = [t for t in range(1, 300) if t not in context]
        requests += [(None, context, rng.sample(rest, n)) for n in rng.sample(range(1, 20), 4)]
    return requests


def _texts(seed: int = 0) -> list[str]:
    """Rolling documents: the longest is over the model's 256 positions, so in several windows."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (30, 120)]


CONFIGS = {"gear-2": dict(method="gear", bits=2), "kivi-2": dict(method="kivi", bits=2),
           # rolling windows' one-token contexts are all sinks: a prompt held without a compressed part
           "kivi-2-sinks": dict(method="kivi", bits=2, sink_tokens=4)}


def _gear(tiny, batch_size, config: str = "gear-2") -> GearHFLM:
    """gear-hf at SMALL; config "exact" is gear-2's scoring path with an exact cache (method
    none's layers) in place of the compressed one."""
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, **SMALL,
                  **CONFIGS["gear-2" if config == "exact" else config])
    if config == "exact":
        exact = {"method": "none", "buffer_size": SMALL["buffer_size"]}  # none takes no group_size
        lm.make_cache = lambda attention_mask=None: GearCache(exact, lm.model.config, attention_mask)
    return lm


def _one_at_a_time(lm: GearHFLM, requests) -> list[tuple[float, bool]]:
    return [score_one(lm.model, window(c, x, lm.max_length), lm.make_cache) for _, c, x in requests]


def _windows(lm: GearHFLM, text: str) -> list[tuple[None, list[int], list[int]]]:
    """A document's requests as loglikelihood_rolling cuts it (one-token contexts)."""
    windows = utils.get_rolling_token_windows(token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
                                              max_seq_len=lm.max_length, context_len=1)
    return [(None, *utils.make_disjoint_window(w)) for w in windows]


@functools.cache
def _reference(tiny: str, config: str) -> tuple[list[tuple[float, bool]], list[float]]:
    """One request at a time: the answers to _choices() and the totals of _texts()."""
    lm = _gear(tiny, 1, config)
    rolled = [sum(ll for ll, _ in _one_at_a_time(lm, _windows(lm, t))) for t in _texts()]
    return _one_at_a_time(lm, _choices()), rolled


def _batched(lm: GearHFLM) -> tuple[list[tuple[float, bool]], list[float]]:
    """gear-hf's own loglikelihood path: the answers to _choices() and the totals of _texts()."""
    rolling = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in _texts()]
    return lm._loglikelihood_tokens(_choices(), disable_tqdm=True), lm.loglikelihood_rolling(rolling, disable_tqdm=True)


def _gaps(got, want) -> list[float]:
    return [abs(a[0] - b[0]) for a, b in zip(got, want, strict=True)]


@pytest.mark.parametrize("config", ["exact", "gear-2", "kivi-2", "kivi-2-sinks"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_requests_score_bitwise_as_one_at_a_time(tiny, batch_size, config):
    lm = _gear(tiny, batch_size, config)
    (got, rolled), (want, rolled_want) = _batched(lm), _reference(tiny, config)
    assert got == want and rolled == rolled_want
    memory = lm.gear_summary()["memory"]
    requests = len(_choices()) + sum(len(_windows(lm, t)) for t in _texts())
    assert memory["sequences"]["loglikelihood"] == memory["kv_caches"] == requests


def test_the_order_of_the_requests_moves_no_answer(tiny):
    """Forks of one compressed prompt never see each other's continuations: requests in any
    order (a context's prompt then prefilled again when its requests are apart) answer alike."""
    lm = _gear(tiny, 1)
    windows = [window(c, x, lm.max_length) for _, c, x in _choices()]
    shuffled = list(range(len(windows)))
    random.Random(1).shuffle(shuffled)
    answers = [a for a, _ in score_requests(lm.model, windows, lm.make_cache)]
    again = [a for a, _ in score_requests(lm.model, [windows[i] for i in shuffled], lm.make_cache)]
    assert [answers[i] for i in shuffled] == again


def test_a_shared_context_is_prefilled_and_compressed_once(tiny, monkeypatch):
    """The choices of a doc share one prefill: each context runs once, alone, and the cache
    compresses it once."""
    lm = _gear(tiny, 12)
    requests = _choices()[:12]  # three contexts, four choices each
    prefills, compressed = [], []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache.get_seq_length() == 0:  # a fresh cache: this call is the prefill
            prefills.append(tuple(ids.shape))

    prompt = GearLayer._compress_prompt
    monkeypatch.setattr(GearLayer, "_compress_prompt", lambda layer, k, v: compressed.append(k.shape) or prompt(layer, k, v))
    hook = lm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()
    assert sorted(prefills) == [(1, 3), (1, 17), (1, 40)]  # the three contexts, each alone
    assert len(compressed) == 3 * lm.model.config.num_hidden_layers
    memory = lm.gear_summary()["memory"]
    assert memory["kv_caches"] == 12 and memory["sequences"] == {"loglikelihood": 12}


def test_the_response_cache_gets_every_answer(tiny):
    """lm-eval's response cache gets each request's answer, in the requests' order."""
    lm = _gear(tiny, 3)
    calls = []
    lm.cache_hook.add_partial = lambda *args: calls.append(args)
    requests = [((f"context {i}", f"choice {i}"), c, x) for i, (_, c, x) in enumerate(_choices())]
    answers = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert calls == [("loglikelihood", r[0], a) for r, a in zip(requests, answers, strict=True)]


@pytest.mark.parametrize("batch_size", [3, "auto"])
def test_method_none_is_hflm_at_any_batch_size(tiny, batch_size):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny, device="cpu", batch_size=batch_size, max_batch_size=8)
    none = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, max_batch_size=8, method="none")
    assert _batched(none) == _batched(hf)
    assert none.gear_summary()["memory"]["kv_caches"] == 0


def test_compressed_scoring_detects_no_batch_size(tiny):
    """Requests run one at a time, so batch_size=auto has nothing to size: no detection (each
    would be a collective under data parallelism, and costly on a CPU)."""
    lm = _gear(tiny, "auto")
    lm._detect_batch_size = lambda *args, **kwargs: pytest.fail("batch size detected")
    assert len(lm._loglikelihood_tokens(_choices(), disable_tqdm=True)) == 20
