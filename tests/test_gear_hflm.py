"""The `gear-hf` model in process: what each request type compresses, and what it reports."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from gear_kernels import GearConfigError
from lm_eval_gear.forcing import forward_with_cache
from lm_eval_gear.model import GearHFLM, rows_that_fit, summary_line

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import build_tiny_lm  # noqa: E402

SMALL = dict(buffer_size=4, group_size=8)  # so short prompts and continuations compress


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


def _ll_requests(n=10, seed=0):
    rng = random.Random(seed)
    return [
        (None, [rng.randrange(1, 299) for _ in range(rng.randrange(2, 40))],
         [rng.randrange(1, 299) for _ in range(rng.randrange(1, 20))])
        for _ in range(n)
    ]


def _gen_requests(texts, max_gen_toks=12):
    kwargs = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (t, dict(kwargs)), i) for i, t in enumerate(texts)]


TEXTS = ["the cat sat on the mat and", "one plus two is", "what is the answer to the question of the dog", "ten"]


def test_method_none_is_hflm(tiny):
    hf = HFLM(pretrained=tiny, device="cpu", batch_size=3)
    none = GearHFLM(pretrained=tiny, device="cpu", batch_size=3, method="none")
    requests = _ll_requests()
    assert none._loglikelihood_tokens(requests) == hf._loglikelihood_tokens(requests)
    assert none.generate_until(_gen_requests(TEXTS), disable_tqdm=True) == hf.generate_until(
        _gen_requests(TEXTS), disable_tqdm=True
    )
    memory = none.gear_summary()["memory"]
    assert memory["sequences"] == {"generate_until": len(TEXTS)} and memory["ratio"] == 1.0


def test_loglikelihood_scores_the_continuation_against_the_compressed_context(tiny):
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=3, method="gear", bits=2, **SMALL)
    context, continuation = [5, 17, 42, 8, 99, 23, 64, 7, 31, 12, 250], [77, 3, 140, 9, 56, 61]
    got = lm._loglikelihood_tokens([(None, context, continuation)])[0]

    # by hand: the context is the prompt (exact prefill, then compressed), the continuation is
    # teacher-forced through the cache; the first continuation token comes from the prefill
    tokens = torch.tensor([context + continuation[:-1]])
    logits = forward_with_cache(lm.model, tokens, lm.make_cache(), len(context))
    logprobs = torch.log_softmax(logits[0, len(context) - 1 :], dim=-1)
    target = torch.tensor(continuation)
    # gear-hf's prefill computes the last position's logits only: the same up to rounding
    assert got[0] == pytest.approx(float(logprobs.gather(1, target[:, None]).sum()), abs=1e-5)
    assert got[1] == bool((logprobs.argmax(-1) == target).all())

    # the first token is scored by the exact prefill, so a one-token continuation equals hf's
    hf = HFLM(pretrained=tiny, device="cpu", batch_size=1)
    one = (None, context, continuation[:1])
    assert lm._loglikelihood_tokens([one])[0][0] == pytest.approx(hf._loglikelihood_tokens([one])[0][0], abs=1e-5)


def test_compression_error_shrinks_with_bits(tiny):
    requests = _ll_requests(4, seed=1)
    exact = [ll for ll, _ in HFLM(pretrained=tiny, device="cpu", batch_size=4)._loglikelihood_tokens(requests)]

    def error(**options):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=4, **SMALL, **options)
        got = [ll for ll, _ in lm._loglikelihood_tokens(requests)]
        return max(abs(a - b) for a, b in zip(got, exact, strict=True))

    two, eight = error(method="gear", bits=2), error(method="gear", bits=8)
    assert two > eight > 0
    assert eight < 0.01 * max(abs(e) for e in exact)


def test_packed_attention_on_cpu_scores_as_the_rebuilt_path_with_a_block_beside_the_store(tiny, monkeypatch):
    """attention=packed on CPU: the packed torch path, in blocks (of 8 tokens here), answers as
    the rebuilt path does, and reports one block of working copy where the rebuilt path reports
    every layer's keys and values."""
    from gear_kernels import attention_reference

    monkeypatch.setattr(attention_reference, "BLOCK_TOKENS", 8)
    requests, gens = _ll_requests(6, seed=2), _gen_requests(TEXTS[:2], max_gen_toks=10)
    runs = {}
    for path in ("rebuilt", "packed"):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=3, method="gear", bits=2, attention=path, **SMALL)
        runs[path] = (lm._loglikelihood_tokens(requests), lm.generate_until(gens, disable_tqdm=True), lm.gear_summary())
    (ll_rebuilt, gen_rebuilt, rebuilt), (ll_packed, gen_packed, packed) = runs["rebuilt"], runs["packed"]
    assert [g for g, _ in ll_packed] == pytest.approx([g for g, _ in ll_rebuilt], abs=1e-4)
    assert gen_packed == gen_rebuilt
    assert (rebuilt["config"]["attention"], packed["config"]["attention"]) == ("rebuilt", "packed")
    assert packed["memory"]["total_bytes"] == rebuilt["memory"]["total_bytes"]
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, method="gear", bits=2, attention="packed", **SMALL)
    config = lm.model.config
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    block = 2 * 8 * heads * dim * (4 + 4)  # one row's 8 tokens of K and V, fp32 model and fp32 copy
    assert packed["memory"]["peak_working_bytes"] == block < rebuilt["memory"]["peak_working_bytes"]


def test_rolling_loglikelihood_streams_the_whole_text(tiny):
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=4, buffer_size=32, group_size=8)
    hf = HFLM(pretrained=tiny, device="cpu", batch_size=2)
    text = "the cat sat on the mat " * 45  # longer than the 256 positions: two windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    got, = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    want, = hf.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert math.isfinite(got) and got != want and abs(got - want) < 0.05 * abs(want)
    memory = lm.gear_summary()["memory"]
    assert memory["sequences"]["loglikelihood"] >= 2  # one row per window


def test_generation_does_not_depend_on_the_batch(tiny):
    """Each prompt generates through a cache of its own (tests/test_generate_alone.py)."""
    outs = {}
    for batch_size in (1, 4):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, method="gear", bits=2, **SMALL)
        outs[batch_size] = lm.generate_until(_gen_requests(TEXTS, max_gen_toks=16), disable_tqdm=True)
        memory = lm.gear_summary()["memory"]
        assert memory["sequences"] == {"generate_until": len(TEXTS)}
        assert memory["kv_caches"] == len(TEXTS)
    assert outs[1] == outs[4]
    hf = HFLM(pretrained=tiny, device="cpu", batch_size=4)
    assert outs[1] != hf.generate_until(_gen_requests(TEXTS, max_gen_toks=16), disable_tqdm=True)


def test_beam_search_through_gen_kwargs(tiny):
    """`--gen_kwargs num_beams=3`: generate repeats the batch's rows, the cache its mask.
    (lm-eval's HFLM keeps one sequence a request, so num_return_sequences is not for gen_kwargs.)"""
    outs = {}
    for batch_size in (1, 4):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=batch_size, method="gear", bits=2, **SMALL)
        requests = _gen_requests(TEXTS, max_gen_toks=10)
        for r in requests:
            r.args[1]["num_beams"] = 3
        outs[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert outs[1] == outs[4] and all(isinstance(o, str) for o in outs[1])


def test_response_cache_is_kept_per_configuration(tiny, tmp_path):
    """lm-eval's CachingLM keys responses by request alone: gear-hf takes only a file tagged with
    its own configuration, so a bits=4 run cannot read a bits=2 run's answers."""
    from lm_eval.api.model import CachingLM

    two = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=2, **SMALL)
    four = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=4, **SMALL)
    with pytest.raises(GearConfigError, match="keys responses by request alone"):
        CachingLM(two, str(tmp_path / "responses_rank0.db"))
    assert two._response_cache_tag != four._response_cache_tag
    answers = {}
    for lm in (two, four):
        cached = CachingLM(lm, str(tmp_path / f"responses{lm._response_cache_tag}_rank0.db"))
        answers[lm] = cached.generate_until(_gen_requests(TEXTS, max_gen_toks=12))
        assert lm.gear_summary()["memory"]["response_cache"].endswith(f"{lm._response_cache_tag}_rank0.db")
    assert answers[two] != answers[four]
    assert answers[two] == GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=2,
                                    **SMALL).generate_until(_gen_requests(TEXTS, max_gen_toks=12), disable_tqdm=True)


def test_an_argument_nobody_takes_is_named(tiny):
    with pytest.raises(GearConfigError, match=r"--model_args warp_speed=9 is not an option of gear-hf"):
        GearHFLM(pretrained=tiny, device="cpu", method="gear", warp_speed=9)


def test_model_info_holds_config_and_memory(tiny, capsys):
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=4, **SMALL)
    lm.generate_until(_gen_requests(TEXTS[:2]), disable_tqdm=True)
    lm._loglikelihood_tokens(_ll_requests(3))
    info = lm.get_model_info()
    json.dumps(info["gear"])  # plain JSON
    config, memory = info["gear"]["config"], info["gear"]["memory"]
    assert config["method"] == "gear" and config["bits"] == 4 and config["buffer_size"] == 4
    assert memory["sequences"] == {"generate_until": 2, "loglikelihood": 3}
    assert memory["total_bytes"] == sum(memory["bytes"].values())
    assert memory["bits_per_element"] == pytest.approx(8 * memory["total_bytes"] / memory["elements"])
    assert memory["ratio"] == pytest.approx(memory["dense_bytes"] / memory["total_bytes"])
    assert memory["peak_device_allocated_bytes"] is None  # CPU
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == summary_line(info["gear"])
    assert printed[-1].startswith("gear-hf: method=gear bits=4 backbone=kivi")


def test_a_cache_larger_than_dense_is_said_so(tiny, capsys, caplog):
    """outlier_ratio=0.99 keeps nearly every entry as a value and its index: the summary says
    "larger than dense" (not "0.65x smaller"), and the model warns as soon as it is built."""
    with caplog.at_level("WARNING", logger="lm_eval_gear.model"):
        lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=2, outlier_ratio=0.99, **SMALL)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "lm_eval_gear.model"]
    assert warning.startswith("gear-hf: this configuration stores ") and "outliers " in warning
    assert warning.endswith("more than the 32 of the uncompressed cache: the compressed cache will be the larger")
    lm.generate_until(_gen_requests(TEXTS[:2]), disable_tqdm=True)
    summary = lm.gear_summary()
    ratio = summary["memory"]["ratio"]
    assert ratio < 1
    assert f"{1 / ratio:.2f}x larger than dense;" in summary_line(summary) and "smaller" not in summary_line(summary)

    caplog.clear()
    with caplog.at_level("WARNING", logger="lm_eval_gear.model"):
        GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="gear", bits=2, **SMALL)
    assert [r for r in caplog.records if r.name == "lm_eval_gear.model"] == []  # smaller than dense: no word


def test_sinks_that_cover_every_prompt_are_said_so(tiny):
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, method="kivi", bits=2, sink_tokens=64)
    lm.generate_until(_gen_requests(TEXTS, max_gen_toks=8), disable_tqdm=True)  # short prompts, no chunk flushed
    summary = lm.gear_summary()
    assert summary["memory"]["bytes"]["codes"] == 0 and summary["memory"]["bytes"]["sinks"] > 0
    assert summary["memory"]["ratio"] == 1
    assert "as large as dense (nothing was compressed: sink_tokens=64 covered every prompt);" in summary_line(summary)
    few = GearHFLM(pretrained=tiny, device="cpu", batch_size=2, method="kivi", bits=2, sink_tokens=2)
    few.generate_until(_gen_requests(TEXTS, max_gen_toks=8), disable_tqdm=True)
    assert "nothing was compressed" not in summary_line(few.gear_summary())


def test_auto_batch_size_on_cpu_is_what_fits_without_a_trial_run(tiny, monkeypatch):
    """HFLM's detection runs five forward passes of 64 rows at full length on a CPU (minutes, tens
    of GB on SmolLM2); on CPU gear-hf sizes the batch from the free memory instead."""
    import psutil

    def no_trial(*args, **kwargs):
        raise AssertionError("HFLM's detection ran")

    monkeypatch.setattr(HFLM, "_detect_batch_size", no_trial)
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size="auto", method="gear", bits=2, **SMALL)
    free = psutil.virtual_memory().available
    expected = rows_that_fit(free // 2, lm.max_length, lm.model.config, lm.model.dtype, lm.max_batch_size)
    assert lm._detect_batch_size() == expected == 64  # the tiny model fits 64 rows of 256 tokens
    outs = lm.generate_until(_gen_requests(TEXTS, max_gen_toks=16), disable_tqdm=True)
    one = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, method="gear", bits=2, **SMALL)
    assert outs == one.generate_until(_gen_requests(TEXTS, max_gen_toks=16), disable_tqdm=True)
    requests = _ll_requests()
    batched, alone = lm._loglikelihood_tokens(requests), one._loglikelihood_tokens(requests)
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-4)


def test_rows_that_fit_count_logits_cache_and_scores():
    """SmolLM2-135M's shapes (fp32): a row of 8192 tokens holds 8192 x (2 x 49152 x 4 logits and
    log-softmax + 2 x 2 x 30 x 3 x 64 x 4 cache + 9 x 8192 x 4 scores) bytes, 6.4 GB."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64)
    row = 8192 * (2 * 49152 * 4 + 2 * 2 * 30 * 3 * 64 * 4 + 9 * 8192 * 4)
    assert rows_that_fit(3 * row, 8192, config, torch.float32, 64) == 3
    assert rows_that_fit(3 * row - 1, 8192, config, torch.float32, 64) == 2
    assert rows_that_fit(row // 2, 8192, config, torch.float32, 64) == 1  # never 0: batch 1 always runs
    assert rows_that_fit(10**15, 8192, config, torch.float32, 64) == 64  # at most max_batch_size
    assert rows_that_fit(3 * row, 8192, config, torch.bfloat16, 64) > 3  # half the bytes a logit


@pytest.mark.slow
def test_embedded_smollm2_is_the_default():
    lm = GearHFLM(device="cpu", batch_size=1, method="gear", bits=4)
    assert lm.model.config.num_hidden_layers == 30 and lm.model.config.num_key_value_heads == 3
    (out,) = lm.generate_until(_gen_requests(["Question: What is 2 + 3?\nAnswer:"], max_gen_toks=8), disable_tqdm=True)
    assert isinstance(out, str) and out.strip()
    assert lm.get_model_info()["model_name"].startswith("SmolLM2-135M-Instruct")
