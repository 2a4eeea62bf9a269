"""GearConfig: paper defaults, and one clear error for every bad value."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gear_kernels import GearConfig, GearConfigError


def test_defaults_are_the_papers():
    config = GearConfig()
    assert (config.method, config.bits, config.backbone, config.group_size) == ("gear", 2, "kivi", 64)
    assert (config.outlier_ratio, config.rank_prompt, config.rank_chunk) == (0.02, 4, 2)
    assert (config.power_iters, config.buffer_size) == (3, 64)


@pytest.mark.parametrize(
    "method, outliers, lowrank, compresses",
    [
        ("none", False, False, False),
        ("kivi", False, False, True),
        ("gear-l", False, True, True),
        ("gear", True, True, True),
    ],
)
def test_method_selects_components(method, outliers, lowrank, compresses):
    config = GearConfig(method=method)
    assert (config.uses_outliers, config.uses_lowrank, config.compresses) == (outliers, lowrank, compresses)


def test_gear_without_outlier_ratio_keeps_no_outliers():
    assert not GearConfig(method="gear", outlier_ratio=0).uses_outliers


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("backbone", ["kivi", "kcvt", "flexgen"])
def test_every_allowed_bits_and_backbone(bits, backbone):
    assert GearConfig(bits=bits, backbone=backbone).bits == bits


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("method", "quant", "one of none, kivi, gear-l, gear"),
        ("method", "GEAR", "one of none, kivi, gear-l, gear"),
        ("bits", 5, "one of 2, 3, 4, 8"),
        ("bits", 16, "one of 2, 3, 4, 8"),
        ("bits", 2.0, "one of 2, 3, 4, 8"),  # would pass `in (2, 3, 4, 8)`, then break bit shifts
        ("bits", True, "one of 2, 3, 4, 8"),
        ("bits", "2", "one of 2, 3, 4, 8"),
        ("backbone", "kv", "one of kivi, kcvt, flexgen"),
        ("kernel", "cuda", "one of auto, triton, torch"),
        ("group_size", 0, "an integer >= 1"),
        ("group_size", -64, "an integer >= 1"),
        ("group_size", 32.0, "an integer >= 1"),
        ("outlier_ratio", 1.5, "a number in [0, 1)"),
        ("outlier_ratio", 1.0, "a number in [0, 1)"),
        ("outlier_ratio", -0.01, "a number in [0, 1)"),
        ("outlier_ratio", float("nan"), "a number in [0, 1)"),
        ("outlier_ratio", "0.02", "a number in [0, 1)"),
        ("rank_prompt", -1, "an integer >= 0"),
        ("rank_chunk", -2, "an integer >= 0"),
        ("power_iters", 0, "an integer >= 1"),
        ("buffer_size", 0, "an integer >= 1"),
        ("seed", -1, "an integer >= 0"),
    ],
)
def test_bad_value_names_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(GearConfigError) as raised:
        GearConfig(**{field: value})
    assert str(raised.value) == f"GearConfig.{field}={value!r} is invalid: allowed {allowed}"


def test_config_error_is_a_value_error():
    assert issubclass(GearConfigError, ValueError)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GearConfig().bits = 4


def test_from_options_parses_command_line_strings():
    config = GearConfig.from_options({"method": " KIVI ", "bits": "4", "outlier_ratio": "0.05", "rank_prompt": 0})
    assert config == GearConfig(method="kivi", bits=4, outlier_ratio=0.05, rank_prompt=0)


def test_from_options_round_trips_as_dict():
    config = GearConfig(method="gear-l", bits=3, backbone="flexgen", group_size=32, seed=7)
    assert GearConfig.from_options(config.as_dict()) == config
    assert set(config.as_dict()) == set(GearConfig.field_names())


def test_from_options_unknown_key_lists_valid_ones():
    with pytest.raises(GearConfigError, match=re.escape("unknown GEAR option 'bit': valid options are method, bits")):
        GearConfig.from_options({"bit": "2"})


@pytest.mark.parametrize("key, raw", [("bits", "two"), ("outlier_ratio", "2%"), ("group_size", "64.5"), ("bits", "nan")])
def test_from_options_unparsable_value_names_key(key, raw):
    with pytest.raises(GearConfigError, match=re.escape(f"GearConfig.{key}={raw!r} is invalid")):
        GearConfig.from_options({key: raw})
