"""The packed attention path (kernel=triton, here under TRITON_INTERPRET) against the torch path."""

from __future__ import annotations

import pytest
import torch

from lm_eval_gear import GearCache, GearConfig, use_gear_attention
from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.forcing import forward_with_cache
from tiny_models import VOCAB, tiny_model

SETTINGS = dict(method="gear", bits=2, group_size=8, buffer_size=8)


@pytest.fixture(scope="module")
def models():
    """The same weights twice: one attends as usual (torch path), one through use_gear_attention."""
    plain, config = tiny_model("llama")
    packed, _ = tiny_model("llama")
    use_gear_attention(packed)
    return plain, packed


def generate(model, ids, mask, kernel):
    cache = GearCache(GearConfig(**SETTINGS, kernel=kernel), model.config, mask)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True, **{cache_kwarg(model): cache},
    )
    return out.sequences, torch.stack(out.logits)


def test_triton_generates_what_the_torch_path_generates(models):
    plain, packed = models
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the packed path reads row 1's prompt chunk without its pads
    tokens, logits = generate(plain, ids, mask, "torch")
    triton_tokens, triton_logits = generate(packed, ids, mask, "triton")
    assert torch.equal(tokens, triton_tokens)
    torch.testing.assert_close(triton_logits, logits, rtol=1e-4, atol=1e-4)


def test_packed_scoring_pieces_match_the_torch_path(models):
    """Several queries at once (buffer-aligned pieces), causal inside the buffer."""
    plain, packed = models
    ids = torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    expected = forward_with_cache(plain, ids, GearCache(GearConfig(**SETTINGS, kernel="torch"), plain.config), 11)
    got = forward_with_cache(packed, ids, GearCache(GearConfig(**SETTINGS, kernel="triton"), packed.config), 11)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_triton_without_packed_attention_is_refused(models):
    plain, _ = models
    cache = GearCache(GearConfig(**SETTINGS, kernel="triton"), plain.config)
    with pytest.raises(ValueError, match="use_gear_attention"):
        plain(torch.ones(1, 5, dtype=torch.long), **{cache_kwarg(plain): cache})
