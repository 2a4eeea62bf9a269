"""Generation with each prompt prefilled alone (lm_eval_gear.prefill): for every codec, a prompt
compresses to the same values, and its first generated token gets the same logits, alone or in a
left-padded batch; gear-hf's generate_until then answers alike at every batch size."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import GearConfig
from gear_kernels.codecs import METHODS
from lm_eval_gear import GearCache, prompts_prefilled_alone
from lm_eval_gear.compat import cache_kwarg
from tiny_models import generate, left_padded, prompts, tiny_model

ROWS = (13, 5, 22)
COMPRESSING = [m for m in METHODS if GearConfig(method=m).compresses]


def _first_step(model, ids, mask, cache, alone: bool):
    """generate() of one token -> its logits (rows, vocab); `cache` then holds the compressed prompts."""
    kwargs = dict(mask=mask, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    if not alone:
        return generate(model, ids, cache, **kwargs).logits[0]
    with prompts_prefilled_alone(model, cache):
        return generate(model, ids, cache, **kwargs).logits[0]


@pytest.mark.parametrize("options", [{}, {"rotation": "hadamard", "sink_tokens": 2}])
@pytest.mark.parametrize("method", COMPRESSING)
def test_a_prompt_compresses_alike_alone_and_in_a_padded_batch(method, options):
    model, config = tiny_model("llama")
    settings = GearConfig(method=method, bits=2, group_size=8, buffer_size=4, **options)
    rows = [prompts(1, n, seed=n)[0] for n in ROWS]
    ids, mask = left_padded(rows)
    batch = GearCache(settings, config, mask)
    logits = _first_step(model, ids, mask, batch, alone=True)
    for i, row in enumerate(rows):
        alone = GearCache(settings, config)
        want = _first_step(model, row[None], None, alone, alone=False)  # plain generate() of the prompt alone
        assert torch.equal(logits[i], want[0])
        for ours, theirs in zip(batch.layers, alone.layers, strict=True):
            mine = ours.store.select_rows(torch.tensor([i]))  # what attention reads of row i
            for got, expected in zip(mine.dense(), theirs.store.dense(), strict=True):
                assert torch.equal(got[:, :, -len(row) :], expected)


def test_beams_prefill_each_distinct_prompt_once():
    """generate() repeats each prompt for its beams before the prefill: each runs once, alone."""
    model, config = tiny_model("llama")
    ids, mask = left_padded([prompts(1, n, seed=n)[0] for n in ROWS])
    cache = GearCache(GearConfig(method="kivi", group_size=8, buffer_size=4), config, mask)
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    try:
        with prompts_prefilled_alone(model, cache):
            out = generate(model, ids, cache, mask=mask, num_beams=2, max_new_tokens=6)
    finally:
        hook.remove()
    assert lengths[:4] == [(6, 22), (1, 13), (1, 5), (1, 22)]  # generate's call, then each prompt alone
    assert all(shape == (6, 1) for shape in lengths[4:]) and out.shape == (3, 22 + 6)


def test_the_model_is_given_back_as_it_was():
    model, config = tiny_model("llama")
    cache = GearCache(GearConfig(method="kivi", group_size=8, buffer_size=4), config)
    assert "forward" not in model.__dict__
    with pytest.raises(RuntimeError, match="inside"):
        with prompts_prefilled_alone(model, cache):
            assert "forward" in model.__dict__
            raise RuntimeError("inside")
    assert "forward" not in model.__dict__


def test_a_prefill_it_cannot_do_alone_is_refused():
    model, config = tiny_model("llama")
    cache = GearCache(GearConfig(method="kivi", group_size=8, buffer_size=4), config)
    embeds = model.get_input_embeddings()(prompts(1, 9))
    with prompts_prefilled_alone(model, cache), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds, use_cache=True, **{cache_kwarg(model): cache})


@pytest.mark.slow
def test_gear_hf_generates_alike_at_every_batch_size(smollm2_hflm):
    """Issue 17's reproduction: 2-bit KIVI, rotated, with sinks, small groups and buffer, on
    SmolLM2; each prompt's text was another in a batch of three before prompts were prefilled alone."""
    from lm_eval.api.instance import Instance

    texts = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is",
             "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter who"]
    kwargs = {"until": ["<never>"], "max_gen_toks": 16, "do_sample": False}
    requests = [Instance("generate_until", {}, (t, dict(kwargs)), i) for i, t in enumerate(texts)]
    lm = smollm2_hflm(method="kivi", bits=2, group_size=8, buffer_size=4, rotation="hadamard", sink_tokens=2)
    answers = {}
    for batch_size in (1, 3):
        lm.batch_size_per_gpu = batch_size
        answers[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert answers[1] == answers[3] and all(answers[1])
