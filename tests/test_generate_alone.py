"""gear-hf's generate_until under compression: each prompt generates alone, through a cache of its
own, so the answers are the same at every batch size, for every codec."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from gear_kernels import GearConfig
from gear_kernels.codecs import METHODS
from lm_eval_gear.model import GearHFLM

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import build_tiny_lm  # noqa: E402

COMPRESSING = [m for m in METHODS if GearConfig(method=m).compresses]
TEXTS = ["the cat sat on the mat and", "one plus two is", "what is the answer to the question of the dog", "ten"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


def _requests(texts, until=("<never>",), max_gen_toks=10):
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (t, dict(kwargs)), i) for i, t in enumerate(texts)]


@pytest.mark.parametrize("options", [{}, {"rotation": "hadamard", "sink_tokens": 2}])
@pytest.mark.parametrize("method", COMPRESSING)
def test_answers_are_the_same_at_every_batch_size(tiny, method, options):
    answers = {}
    for batch_size in (1, 3, 4):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, method=method, bits=2, group_size=8,
                      buffer_size=4, **options)
        answers[batch_size] = lm.generate_until(_requests(TEXTS), disable_tqdm=True)
    assert answers[1] == answers[3] == answers[4] and all(answers[1])


def test_a_batch_comes_back_as_generate_returns_it(tiny):
    """_model_generate on a left-padded batch: the padded prompts, then each row's tokens as that
    prompt alone generates them, pads after a row that stopped sooner (HFLM cuts at the prompts'
    width and decodes)."""
    lm = GearHFLM(pretrained=tiny, device="cpu", method="kivi", bits=2, group_size=8, buffer_size=4)
    tok = lm.tokenizer
    tok.padding_side = "left"
    batch = tok(TEXTS[:3], return_tensors="pt", padding=True)
    width, new = batch.input_ids.shape[1], 7
    out = lm._model_generate(batch.input_ids, width + new, [], attention_mask=batch.attention_mask, do_sample=False)
    assert torch.equal(out[:, :width], batch.input_ids)
    for b, text in enumerate(TEXTS[:3]):
        alone = tok(text, return_tensors="pt").input_ids
        want = lm._model_generate(alone, alone.shape[1] + new, [], attention_mask=torch.ones_like(alone), do_sample=False)
        tokens = want[0, alone.shape[1] :]
        assert torch.equal(out[b, width : width + len(tokens)], tokens)
        assert (out[b, width + len(tokens) :] == tok.pad_token_id).all()
    assert lm.gear_summary()["memory"]["sequences"] == {"generate_until": 6}


def test_rows_that_stop_at_other_times_answer_as_alone(tiny):
    """Stop strings end rows at different steps: each answer is cut as at batch size 1."""
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, method="gear", bits=2, group_size=8, buffer_size=4)
    free = lm.generate_until(_requests(TEXTS, max_gen_toks=12), disable_tqdm=True)
    stops = sorted({text.split()[len(text.split()) // 2] for text in free if len(text.split()) > 1})
    assert stops, free  # words the rows do generate, so that some rows stop early
    answers = {}
    for batch_size in (1, 4):
        lm.batch_size_per_gpu = batch_size
        answers[batch_size] = lm.generate_until(_requests(TEXTS, until=stops, max_gen_toks=12), disable_tqdm=True)
    assert answers[1] == answers[4] and answers[1] != free


@pytest.mark.slow
def test_gear_hf_generates_alike_at_every_batch_size(smollm2_hflm):
    """Issue 17's reproduction: 2-bit KIVI, rotated, with sinks, small groups and buffer, on
    SmolLM2; the second prompt's text was another in a batch of three than alone."""
    texts = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is",
             "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter who"]
    requests = _requests(texts, max_gen_toks=16)
    lm = smollm2_hflm(method="kivi", bits=2, group_size=8, buffer_size=4, rotation="hadamard", sink_tokens=2)
    answers = {}
    for batch_size in (1, 3):
        lm.batch_size_per_gpu = batch_size
        answers[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert answers[1] == answers[3] and all(answers[1])
