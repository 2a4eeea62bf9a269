"""fidelity=true: gear-hf runs the exact model on the same requests and reports the distance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from gear_kernels import GearConfigError
from lm_eval_gear.model import GearHFLM
from lm_eval_gear.paired import FidelityRecorder, Generated, Rolled, Scored

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import build_tiny_lm  # noqa: E402

SMALL = dict(buffer_size=4, group_size=8)
QUESTIONS = ["the cat sat on the mat and", "one plus two is", "what is the answer to the question of the dog",
             "ten green bottles standing on the wall and"]
CHOICES = ["red", "the blue one", "a green dog"]
TEXTS = ["the cat sat on the mat " * 12, "one two three four five six seven eight nine ten " * 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


def _requests():
    """Two tasks of each request type, as lm-eval builds them (task name, doc id, choice index)."""
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 14, "do_sample": False}
    gen = [Instance("generate_until", {}, (q, dict(gen_kwargs)), 0, (f"gen_{i % 2}", i, 1))
           for i, q in enumerate(QUESTIONS)]
    choice = [Instance("loglikelihood", {}, (q, " " + c), j, (f"choice_{i % 2}", i, 1))
              for i, q in enumerate(QUESTIONS) for j, c in enumerate(CHOICES)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), 0, ("rolling", i, 1)) for i, t in enumerate(TEXTS)]
    return gen, choice, rolling


def _fidelity(tiny, **options) -> dict:
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, fidelity=True, **options)
    gen, choice, rolling = _requests()
    lm.generate_until(gen, disable_tqdm=True)
    lm.loglikelihood(choice, disable_tqdm=True)
    lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    summary = lm.gear_summary()
    json.dumps(summary)  # plain JSON for the results file
    assert summary["config"]["fidelity"] is True
    return summary["fidelity"]


def test_method_none_is_exactly_the_exact_run(tiny):
    fidelity = _fidelity(tiny, method="none", buffer_size=SMALL["buffer_size"])  # none takes no group_size
    overall = fidelity["overall"]
    gen, ll, rolled = overall["generate_until"], overall["loglikelihood"], overall["loglikelihood_rolling"]
    assert gen["requests"] == 4 and gen["tokens"] > 20
    assert (gen["tf_kl"], gen["tf_top1"], gen["answer_agreement"]) == (0.0, 1.0, 1.0)
    assert (ll["requests"], ll["docs"]) == (12, 4)
    assert (ll["mean_abs_diff"], ll["max_abs_diff"], ll["greedy_agreement"], ll["choice_agreement"]) == (0, 0, 1, 1)
    assert (rolled["requests"], rolled["mean_abs_diff"], rolled["max_abs_diff"]) == (2, 0, 0)


def test_fewer_bits_move_further_from_the_exact_run(tiny):
    runs = {bits: _fidelity(tiny, method="gear", bits=bits, **SMALL)["overall"] for bits in (8, 4, 2)}
    kl = [runs[b]["generate_until"]["tf_kl"] for b in (8, 4, 2)]
    ll = [runs[b]["loglikelihood"]["mean_abs_diff"] for b in (8, 4, 2)]
    rolled = [runs[b]["loglikelihood_rolling"]["mean_abs_diff"] for b in (8, 4, 2)]
    assert 0 < kl[0] < kl[1] < kl[2]
    assert 0 < ll[0] < ll[1] < ll[2]
    assert 0 < rolled[0] < rolled[1] < rolled[2]
    assert runs[2]["generate_until"]["tf_top1"] < 1


def test_per_task_figures_add_up_to_the_overall_ones(tiny):
    fidelity = _fidelity(tiny, method="gear", bits=2, **SMALL)
    overall, tasks = fidelity["overall"], fidelity["per_task"]
    assert sorted(tasks) == ["choice_0", "choice_1", "gen_0", "gen_1", "rolling"]

    def total(kind, count, figure=None):
        parts = [t[kind] for t in tasks.values() if kind in t]
        return sum(p[count] * (1 if figure is None else p[figure]) for p in parts)

    gen = overall["generate_until"]
    assert total("generate_until", "requests") == gen["requests"]
    assert total("generate_until", "tokens") == gen["tokens"]
    assert total("generate_until", "tokens", "tf_kl") == pytest.approx(gen["tokens"] * gen["tf_kl"])
    assert total("generate_until", "tokens", "tf_top1") == pytest.approx(gen["tokens"] * gen["tf_top1"])
    assert total("generate_until", "requests", "answer_agreement") == pytest.approx(gen["requests"] * gen["answer_agreement"])
    ll = overall["loglikelihood"]
    assert total("loglikelihood", "docs") == ll["docs"] == 4
    assert total("loglikelihood", "requests", "mean_abs_diff") == pytest.approx(ll["requests"] * ll["mean_abs_diff"])
    assert max(t["loglikelihood"]["max_abs_diff"] for t in tasks.values() if "loglikelihood" in t) == ll["max_abs_diff"]
    assert total("loglikelihood", "docs", "choice_agreement") == pytest.approx(ll["docs"] * ll["choice_agreement"])


def test_fidelity_leaves_the_compressed_results_and_memory_alone(tiny):
    gen, choice, _ = _requests()
    answers, memory = {}, {}
    for fidelity in (False, True):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=2, fidelity=fidelity, **SMALL)
        answers[fidelity] = (lm.generate_until(gen, disable_tqdm=True), lm.loglikelihood(choice, disable_tqdm=True))
        memory[fidelity] = {k: v for k, v in lm.gear_summary()["memory"].items() if k != "notes"}
    assert answers[True] == answers[False] and memory[True] == memory[False]


def test_choice_agreement_takes_the_first_of_equal_highest():
    def doc(exact, compressed):
        return [Scored("t", 0, i, (e, False), (c, False)) for i, (e, c) in enumerate(zip(exact, compressed))]

    agree = FidelityRecorder(scored=doc([-1.0, -1.0, -3.0], [-1.0, -2.0, -3.0]))
    differ = FidelityRecorder(scored=doc([-1.0, -2.0], [-2.0, -1.0]))
    assert agree.summary()["overall"]["loglikelihood"]["choice_agreement"] == 1.0
    assert differ.summary()["overall"]["loglikelihood"]["choice_agreement"] == 0.0
    single = FidelityRecorder(scored=doc([-1.0], [-1.5]), rolled=[Rolled("r", -10.0, -12.5)],
                              generated=[Generated("g", 0, 0.0, 0, True)])
    overall = single.summary()["overall"]
    assert overall["loglikelihood"]["choice_agreement"] is None  # no doc with two choices
    assert overall["loglikelihood"]["max_abs_diff"] == 0.5 and overall["loglikelihood_rolling"]["max_abs_diff"] == 2.5
    assert overall["generate_until"]["tf_kl"] is None  # an empty answer has no tokens to force


@pytest.mark.parametrize("raw", ["maybe", 2, 0.5])
def test_fidelity_takes_true_or_false(tiny, raw):
    with pytest.raises(GearConfigError, match="fidelity=.* is invalid: allowed true or false"):
        GearHFLM(pretrained=tiny, device="cpu", fidelity=raw)


def test_fidelity_refuses_the_response_cache(tiny, tmp_path):
    from lm_eval.api.model import CachingLM

    lm = GearHFLM(pretrained=tiny, device="cpu", method="gear", fidelity="true")
    with pytest.raises(GearConfigError, match="fidelity=true compares every request"):
        CachingLM(lm, str(tmp_path / f"responses{lm._response_cache_tag}_rank0.db"))
