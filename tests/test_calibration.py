"""budget=B (lm_eval_gear.calibration): the grid, the choice on a tiny model, gear-hf's option."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gear_kernels import GearConfig, GearConfigError
from lm_eval_gear import calibration
from lm_eval_gear.model_args import check_model_args, response_cache_tag, split_model_args

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import build_tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5, 4.5])
def test_candidates_are_configs_estimated_within_a_bit_under_the_budget(budget):
    grid = calibration.candidates(budget, 64)
    assert grid and len(grid) == len({tuple(sorted(o.items())) for o in grid})
    for options in grid:
        GearConfig.from_options(options)  # each one builds
        assert budget - 1 <= calibration.estimated_bits(options, 64) <= budget
        assert options["key_bits"] >= options["value_bits"]
    assert {o["rotation"] for o in grid} == {"none", "hadamard"}
    assert {o.get("backbone", "kivi") for o in grid} == {"kivi", "turboquant"}
    assert all(o["rotation"] == "hadamard" for o in grid if "backbone" in o)  # TurboQuant's codebook assumes it
    unrotated = calibration.candidates(budget, 64, rotation=False)
    assert {o["rotation"] for o in unrotated} == {"none"} and not any("backbone" in o for o in unrotated)


@pytest.mark.parametrize(("options", "bits"), [
    ({"method": "kivi", "key_bits": 3, "value_bits": 2, "group_size": 80, "rotation": "hadamard", "sink_tokens": 1},
     (3 + 2) / 2 + (32 / 80 + 32 / 64) / 2),
    ({"method": "kivi", "key_bits": 4, "value_bits": 4, "group_size": 128, "rotation": "none", "sink_tokens": 0},
     4 + (32 / 128 + 32 / 64) / 2),
    ({"method": "kivi", "backbone": "turboquant", "key_bits": 3, "value_bits": 2, "rotation": "hadamard",
      "sink_tokens": 0}, (3 + 2) / 2 + 16 / 64),
])
def test_the_estimate_counts_the_codes_and_their_scales(options, bits):
    """kivi: the codes and an fp16 scale and zero point a group (keys grouped over group_size
    tokens, values over at most head_dim channels); turboquant: the codes and an fp16 norm a
    vector. Sinks are left out."""
    assert calibration.estimated_bits(options, 64) == pytest.approx(bits)


def test_the_long_prompt_holds_its_needle_in_its_middle(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = calibration.haystack_prompt(tokenizer, tokens=600)[0]
    text = tokenizer.decode(ids)
    assert 400 <= len(ids) <= 650 and text.count("7150342") == 1, (len(ids), text[:200])
    assert 0.4 < text.index("7150342") / len(text) < 0.6


def test_gear_hf_budget_chooses_a_config_that_fits_and_reports_it(tiny, capsys):
    from lm_eval_gear.model import GearHFLM

    # head_dim 16: a value group is 16 channels, 2 bits of scale and zero a value; 4.5 bits fit 2-4 bit codes
    lm = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, budget="4.5", buffer_size=16)
    chosen = lm.calibration
    assert chosen.stored_bits <= 4.5 + calibration.SLACK and chosen.kl >= 0 and 0 <= chosen.top1 <= 1
    assert chosen.options in calibration.candidates(4.5, 16)
    assert chosen.candidates == len(calibration.candidates(4.5, 16)) and chosen.prompts == 3 and chosen.seconds > 0
    assert lm.gear_config == GearConfig.from_options({**chosen.options, "buffer_size": 16})
    summary = lm.gear_summary()
    assert summary["calibration"] == chosen.as_dict() and summary["config"]["key_bits"] == chosen.options["key_bits"]
    printed = capsys.readouterr().out
    assert "gear-hf: budget=4.5 chose method=kivi" in printed and f"{chosen.candidates} candidates" in printed
    # the choice is the lowest KL among the candidates measured on every prompt: a second run agrees
    again = GearHFLM(pretrained=tiny, device="cpu", batch_size=1, budget=4.5, buffer_size=16).calibration
    assert (again.options, again.kl) == (chosen.options, chosen.kl)


def test_a_budget_no_candidate_fits_names_the_least_that_does(tiny):
    from lm_eval_gear.model import GearHFLM

    with pytest.raises(GearConfigError, match=r"budget=2.5: no candidate stores so few bits on this model "
                       r"\(head_dim 16\); give budget >= 3\.00"):
        GearHFLM(pretrained=tiny, device="cpu", batch_size=1, budget=2.5)


@pytest.mark.parametrize(("args", "message"), [
    ({"budget": "lots"}, "budget='lots' is invalid: allowed a number of bits a K/V element, e.g. budget=3.0"),
    ({"budget": -1}, "budget=-1 is invalid"),
    ({"budget": 3, "method": "kivi", "bits": 2}, "budget=3 chooses the method and its options on the model; "
     "drop method, bits (or drop budget)"),
])
def test_bad_budgets_are_refused_before_loading(args, message):
    with pytest.raises(GearConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_model_args({"pretrained": "m", **args})


def test_a_budget_takes_the_shared_options_and_tags_its_own_response_cache():
    config, rest = split_model_args({"pretrained": "m", "budget": "3.0", "buffer_size": "32"})
    assert config.buffer_size == 32 and rest == {"pretrained": "m"}
    tags = {response_cache_tag(config, "m", args) for args in ({}, {"budget": 3.0}, {"budget": 2.5})}
    assert len(tags) == 3
