"""Batched compressed scoring (gear-hf's loglikelihood path) against one request at a time.

The reference is ``scoring.score_one``: each request through a fresh cache of its own, as gear-hf
scored before batching. Batching changes how each request is rounded, not what it computes:
inside a padded batch the model computes a row's keys and values with other rounding, which a
compressed cache could turn into a code one step away. So each distinct context is prefilled
alone (its compressed prompt is bitwise the per-request one) and only the continuations run
batched, and the two agree to float rounding, compressed or not: within 1e-4 on the
multiple-choice sums here, and to 1e-6 of the total on rolling windows (sums of ~3000 nats,
whose own float32 spacing is 2.4e-4). The chunks a continuation flushes are compressed from
batched keys and values, so a code can still flip there: kivi-2 with sinks and rotation
moves one request here by 4e-4 at batch size 8 (3e-5 when nothing flushes).

Contexts and continuations repeat no token: a repeated token has exactly equal values in the
first layer's V (V holds no position there), and which copy the outlier selection keeps exact
is then a matter of rounding, which can move a request far more than a code step does.
"""

from __future__ import annotations

import functools
import random
import sys
from pathlib import Path

import pytest
from lm_eval import utils
from lm_eval.api.instance import Instance

from lm_eval_gear.cache import GearCache
from lm_eval_gear.model import GearHFLM
from lm_eval_gear.scoring import score_batch, score_one, window

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
    none's layers) in place of the compressed one: batched and fed in pieces the same way."""
    # on a CPU auto fits max_batch_size rows of the tiny model: a small one keeps batches several
    limit = {"max_batch_size": 8} if batch_size == "auto" else {}
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, **SMALL, **limit,
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


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_an_exact_cache_scores_batched_as_one_at_a_time(tiny, batch_size):
    """The batching itself (order, prompts padded and shared, rows repeated, continuations padded
    and fed in buffer-aligned pieces) moves nothing beyond float rounding."""
    (got, rolled), (want, rolled_want) = _batched(_gear(tiny, batch_size, "exact")), _reference(tiny, "exact")
    assert max(_gaps(got, want)) < 1e-4
    assert [g for _, g in got] == [g for _, g in want]
    assert rolled == pytest.approx(rolled_want, rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("config", ["gear-2", "kivi-2", "kivi-2-sinks"])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_compressed_batches_score_as_one_at_a_time(tiny, batch_size, config):
    lm = _gear(tiny, batch_size, config)
    (got, rolled), (want, rolled_want) = _batched(lm), _reference(tiny, config)
    gaps = _gaps(got, want)
    memory = lm.gear_summary()["memory"]
    assert memory["sequences"]["loglikelihood"] == len(_choices()) + sum(len(_windows(lm, t)) for t in _texts())
    if batch_size == 1:
        assert max(gaps) < 1e-4 and rolled == pytest.approx(rolled_want, abs=1e-4)
        assert memory["kv_caches"] == memory["sequences"]["loglikelihood"]
        return
    assert max(gaps) < 1e-4  # each context compressed from its own prefill, bitwise as alone
    assert rolled == pytest.approx(rolled_want, rel=1e-6, abs=1e-4)  # as with an exact cache
    assert memory["kv_caches"] < memory["sequences"]["loglikelihood"]


def test_what_the_pads_hold_moves_no_answer(tiny):
    """Continuations padded on the right: a row's pads are compressed into its later chunks, which
    only its pads read; prompts padded on the left: the cache strips their pads. So the pads'
    tokens change no answer, bit for bit, in one batch of short and long continuations."""
    lm = _gear(tiny, 1)
    windows = [window(c, x, lm.max_length) for _, c, x in _choices()[:12]]  # three contexts
    assert {len(w.prompt) for w in windows} == {3, 17, 40}
    assert max(len(w.stream) for w in windows) - min(len(w.stream) for w in windows) > 3 * SMALL["buffer_size"]
    answers = {pad: score_batch(lm.model, windows, lm.make_cache, pad_token=pad)[0] for pad in (0, 7, 250)}
    assert answers[0] == answers[7] == answers[250]


def test_a_shared_context_is_prefilled_and_compressed_once(tiny):
    """The choices of a doc share one prefill: each context runs once, alone, and the cache
    compresses it once."""
    lm = _gear(tiny, 12)
    requests = _choices()[:12]  # three contexts, four choices each
    prefills = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache.get_seq_length() == 0:  # a fresh cache: this call is the prefill
            prefills.append(tuple(ids.shape))

    hook = lm.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        hook.remove()
    assert len(prefills) == 3 and {batch for batch, _ in prefills} == {1}  # one batch; its three contexts alone
    assert max(tokens for _, tokens in prefills) == 40
    memory = lm.gear_summary()["memory"]
    assert memory["kv_caches"] == 1 and memory["sequences"] == {"loglikelihood": 12}


def test_the_response_cache_gets_every_answer(tiny):
    """lm-eval's response cache gets each request's answer, in the requests' order, as before batching."""
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


def test_auto_is_detected_once_a_rank_under_data_parallelism(tiny):
    """auto:N would detect again at points set by the rank's number of requests; each detection is
    a collective, and ranks without lm-eval's padding copies hold different numbers."""
    lm = _gear(tiny, "auto:4")
    detected = []
    lm._detect_batch_size = lambda *args: detected.append(args) or 8
    lm._world_size = 2  # as on a rank of two; no collective runs here
    assert len(lm._loglikelihood_tokens(_choices(), disable_tqdm=True)) == 20
    assert detected == [()]  # once, at the model's full length
    lm._world_size = 1
    assert lm.gear_summary()["memory"]["kv_caches"] == 3  # 20 requests, 8 a batch
