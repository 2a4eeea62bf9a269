"""GearCache and left padding: where a row's padding comes from (the mask, generate's position
ids), beams and returned sequences that repeat the rows, and reset for a new batch."""

from __future__ import annotations

import pytest
import torch

from gear_kernels import GearConfig
from lm_eval_gear import GearCache
from lm_eval_gear.cache import GearLayer, padding_from_positions
from tiny_models import generate, left_padded, prompts, tiny_model

GEAR = GearConfig(method="gear", bits=2, group_size=8, buffer_size=8, rank_prompt=4, rank_chunk=2)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _two_rows(seed: int = 3) -> list[torch.Tensor]:
    return [prompts(1, 13, seed=seed)[0], prompts(1, 21, seed=seed + 1)[0]]


def _alone(model, config, rows, **kwargs) -> list[torch.Tensor]:
    """Each row generated on its own (no padding), new tokens only."""
    return [generate(model, r[None], GearCache(GEAR, config), **kwargs)[:, len(r):] for r in rows]


def test_position_ids_tell_the_padding_of_a_fresh_prompt():
    # generate() numbers each row from 0 at its first real token; pad positions are 0 (or 1)
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [1, 1, 0, 1, 2]])
    assert padding_from_positions(pos, 3, 5).tolist() == [2, 0, 2]
    assert padding_from_positions(torch.arange(5)[None], 3, 5) is None  # no row padded: no evidence
    assert padding_from_positions(torch.arange(5)[None] + 4, 3, 5) is None  # a continuation, not a prompt
    assert padding_from_positions(torch.tensor([[0, 0, 5, 1, 2]]), 1, 5) is None  # not a count from 0
    assert padding_from_positions(pos, 3, 6) is None and padding_from_positions(None, 3, 5) is None


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_padded_batch_without_the_mask_in_the_cache_equals_the_rows_alone(arch):
    """generate() has the mask: a cache built without it learns the padding from the position ids."""
    model, config = tiny_model(arch)
    rows = _two_rows()
    ids, mask = left_padded(rows)
    out = generate(model, ids, GearCache(GEAR, config), mask=mask, max_new_tokens=20)[:, ids.shape[1]:]
    for got, alone in zip(out, _alone(model, config, rows, max_new_tokens=20)):
        assert torch.equal(got, alone[0])


def test_a_mask_that_disagrees_with_the_inputs_is_refused(llama):
    model, config = llama
    ids, mask = left_padded(_two_rows())
    other = torch.ones_like(mask)
    with pytest.raises(ValueError, match="position ids say"):
        generate(model, ids, GearCache(GEAR, config, other), mask=mask)
    with pytest.raises(ValueError, match="not a multiple"):
        generate(model, ids, GearCache(GEAR, config, torch.ones(3, ids.shape[1], dtype=torch.long)), mask=mask)


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2),
                                    dict(do_sample=True, num_return_sequences=3)])
def test_beams_and_returned_sequences_repeat_the_prompt_mask(llama, kwargs):
    """generate() repeats every row (beams, returned sequences); the cache repeats its mask."""
    model, config = llama
    rows = _two_rows()
    ids, mask = left_padded(rows)
    torch.manual_seed(0)
    batched = generate(model, ids, GearCache(GEAR, config, mask), mask=mask, max_new_tokens=14, **kwargs)
    per_prompt = batched.shape[0] // 2
    for i, row in enumerate(rows):
        torch.manual_seed(0)
        alone = generate(model, row[None], GearCache(GEAR, config), max_new_tokens=14, **kwargs)
        got = batched[i * per_prompt : (i + 1) * per_prompt, ids.shape[1]:]
        if kwargs.get("do_sample"):  # sampled rows depend on the batch's random draws: shape only
            assert got.shape == alone[:, len(row):].shape
        else:
            assert torch.equal(got, alone[:, len(row):])


def test_reset_takes_the_next_batch_mask(llama):
    model, config = llama
    first_ids, first_mask = left_padded(_two_rows(seed=3))
    rows = [prompts(1, 17, seed=8)[0], prompts(1, 9, seed=9)[0]]
    ids, mask = left_padded(rows)
    cache = GearCache(GEAR, config, first_mask)
    generate(model, first_ids, cache, mask=first_mask)
    cache.reset(mask)
    assert cache.get_seq_length() == 0
    fresh = generate(model, ids, GearCache(GEAR, config, mask), mask=mask)
    assert torch.equal(generate(model, ids, cache, mask=mask), fresh)
    # without a mask, reset forgets the old padding: generate's position ids tell the new one
    cache.reset()
    assert torch.equal(generate(model, ids, cache, mask=mask), fresh)
    # and a batch of another size is welcome after reset
    cache.reset()
    three = prompts(3, 11, seed=10)
    assert torch.equal(generate(model, three, cache), generate(model, three, GearCache(GEAR, config)))


def test_a_mask_for_another_prompt_length_is_refused():
    layer = GearLayer(GEAR, mask_pads=torch.tensor([6]))
    with pytest.raises(ValueError, match="prompt has 5 tokens"):
        layer.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
