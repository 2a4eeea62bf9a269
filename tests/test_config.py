"""GearConfig: paper defaults, and one clear error for every bad value."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re

import pytest

from gear_kernels import GearConfig, GearConfigError
from gear_kernels.codecs import CODECS, METHODS
from gear_kernels.codecs.base import BITS
from gear_kernels.codecs.kivi import BACKBONES
from gear_kernels.quantizers import QUANTIZERS
from gear_kernels.config import KERNELS, SHARED, option_types


def test_defaults_are_the_papers():
    config = GearConfig()
    codec = config.codec
    assert (config.method, codec.bits, codec.backbone, codec.group_size) == ("gear", 2, "kivi", 64)
    assert (codec.outlier_ratio, codec.rank_prompt, codec.rank_chunk) == (0.02, 4, 2)
    assert (codec.power_iters, config.buffer_size) == (3, 64)


PAPER_COMPONENTS = {  # the paper's methods (DESIGN.md section 2): (outliers, low rank, compresses)
    "none": (False, False, False),
    "kivi": (False, False, True),
    "gear-l": (False, True, True),
    "gear": (True, True, True),
}


def test_registry_holds_the_paper_methods_in_order():
    """In the paper's order, whatever other methods are registered beside them."""
    assert tuple(m for m in METHODS if m in PAPER_COMPONENTS) == tuple(PAPER_COMPONENTS)


@pytest.mark.parametrize("method", PAPER_COMPONENTS)
def test_method_selects_components(method):
    outliers, lowrank, compresses = PAPER_COMPONENTS[method]
    config = GearConfig(method=method)
    assert (config.uses_outliers, config.uses_lowrank, config.compresses) == (outliers, lowrank, compresses)


def test_gear_without_outlier_ratio_keeps_no_outliers():
    assert not GearConfig(method="gear", outlier_ratio=0).uses_outliers


@pytest.mark.parametrize("backbone, bits", [(b, bits) for b in BACKBONES for bits in QUANTIZERS[b].allowed_bits])
def test_every_allowed_bits_and_backbone(bits, backbone):
    assert GearConfig(bits=bits, backbone=backbone).codec.bits == bits


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if set(BITS) - set(QUANTIZERS[b].allowed_bits)])
def test_bits_a_backbone_does_not_take_are_refused(backbone):
    bits = min(set(BITS) - set(QUANTIZERS[backbone].allowed_bits))
    allowed = ", ".join(map(str, QUANTIZERS[backbone].allowed_bits))
    with pytest.raises(GearConfigError, match=re.escape(f"GearConfig.key_bits={bits} is invalid (method 'kivi'): "
                                                        f"allowed one of {allowed}")):
        GearConfig(method="kivi", backbone=backbone, bits=bits)


SHARED_BAD = [  # options of every method: the message names no method
    ("method", "quant", f"one of {', '.join(METHODS)}"),
    ("method", "GEAR", f"one of {', '.join(METHODS)}"),
    ("kernel", "cuda", f"one of {', '.join(KERNELS)}"),
    ("buffer_size", 0, "an integer >= 1"),
    ("seed", -1, "an integer >= 0"),
]
CODEC_BAD = [  # a codec's own options: the message names the method
    ("bits", 5, "one of 2, 3, 4, 8"),
    ("bits", 16, "one of 2, 3, 4, 8"),
    ("bits", 2.0, "one of 2, 3, 4, 8"),  # would pass `in (2, 3, 4, 8)`, then break bit shifts
    ("bits", True, "one of 2, 3, 4, 8"),
    ("bits", "2", "one of 2, 3, 4, 8"),
    ("key_bits", 1, "one of 2, 3, 4, 8"),
    ("value_bits", 6, "one of 2, 3, 4, 8"),
    ("backbone", "kv", f"one of {', '.join(QUANTIZERS)}"),
    ("rotation", "random", "one of none, hadamard"),
    ("sink_tokens", -1, "an integer >= 0"),
    ("sink_tokens", 4.0, "an integer >= 0"),
    ("group_size", 0, "an integer >= 1"),
    ("group_size", -64, "an integer >= 1"),
    ("group_size", 32.0, "an integer >= 1"),
    ("outlier_ratio", 1.5, "a number in [0, 1)"),
    ("outlier_ratio", 1.0, "a number in [0, 1)"),
    ("outlier_ratio", -0.01, "a number in [0, 1)"),
    ("outlier_ratio", float("nan"), "a number in [0, 1)"),
    ("outlier_ratio", "0.02", "a number in [0, 1)"),
    ("outlier_dtype", "fp8", "one of model, fp16"),
    ("rank_prompt", -1, "an integer >= 0"),
    ("rank_chunk", -2, "an integer >= 0"),
    ("power_iters", 0, "an integer >= 1"),
    ("lowrank_dtype", "int4", "one of fp16, int8"),
]


@pytest.mark.parametrize("field, value, allowed", SHARED_BAD)
def test_bad_shared_value_names_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(GearConfigError) as raised:
        GearConfig(**{field: value})
    assert str(raised.value) == f"GearConfig.{field}={value!r} is invalid: allowed {allowed}"


# each bad value, for every method that takes its option (the others refuse the option itself:
# test_unused_option_is_refused_naming_method_and_option)
CODEC_BAD_CASES = [(method, field, value, allowed) for method in METHODS for field, value, allowed in CODEC_BAD
                   if field in CODECS[method].options()]


@pytest.mark.parametrize("method, field, value, allowed", CODEC_BAD_CASES)
def test_bad_codec_value_names_method_field_value_and_what_is_allowed(method, field, value, allowed):
    with pytest.raises(GearConfigError) as raised:
        GearConfig(method=method, **{field: value})
    assert str(raised.value) == f"GearConfig.{field}={value!r} is invalid (method {method!r}): allowed {allowed}"


def test_every_codec_option_has_a_bad_value_case():
    assert {field for field, _, _ in CODEC_BAD} == set(GearConfig.field_names()) - {"method", *SHARED}


UNUSED = [(method, option) for method in METHODS for option in GearConfig.field_names()
          if option != "method" and option not in SHARED and option not in CODECS[method].options()]


def test_every_method_and_codec_option_is_checked_one_way():
    """Each (method, codec option) pair is either a bad value the method refuses or an option it
    does not use: together the two tests cover every method with every option."""
    taken = {(method, field) for method, field, _, _ in CODEC_BAD_CASES}
    pairs = {(method, option) for method in METHODS for option in option_types()}
    assert taken | set(UNUSED) == pairs and not taken & set(UNUSED)


def test_every_method_but_gear_refuses_something():
    assert {method for method, _ in UNUSED} == set(METHODS) - {"gear"}


@pytest.mark.parametrize("method, option", UNUSED)
def test_unused_option_is_refused_naming_method_and_option(method, option):
    value = GearConfig().as_dict()[option]  # even the default value: it was given
    takes = ", ".join([*CODECS[method].options(), *SHARED])
    message = f"method {method!r} does not use {option}; it takes {takes}"
    with pytest.raises(GearConfigError) as raised:
        GearConfig.from_options({"method": method, option: value})
    assert str(raised.value) == message
    with pytest.raises(GearConfigError, match=re.escape(message)):
        GearConfig(method=method, **{option: value})


@pytest.mark.parametrize("options, message", [
    ({"method": "kivi", "rank_prompt": 8}, "method 'kivi' does not use rank_prompt; it takes bits, "),
    ({"method": "kivi", "outlier_ratio": "0.1"}, "method 'kivi' does not use outlier_ratio"),
    ({"method": "gear-l", "outlier_dtype": "fp16"}, "method 'gear-l' does not use outlier_dtype"),
    ({"method": "kivi", "lowrank_dtype": "int8"}, "method 'kivi' does not use lowrank_dtype"),
    ({"method": "none", "bits": "4"}, "method 'none' does not use bits; it takes buffer_size, seed, kernel"),
])
def test_unused_options_from_the_command_line(options, message):
    with pytest.raises(GearConfigError, match=re.escape(message)):
        GearConfig.from_options(options)


@pytest.mark.parametrize("method", METHODS)
def test_defaults_are_not_given_options(method):
    """Only what is passed is checked: every method builds from its name alone, and from its own dict."""
    config = GearConfig.from_options({"method": method})
    assert config == GearConfig(method=method)
    assert GearConfig.from_options(config.as_dict()) == config
    assert set(config.as_dict()) == {"method", *CODECS[method].options(), *SHARED}


def test_key_and_value_bits_default_to_bits():
    assert (GearConfig(bits=4).codec.key_bits, GearConfig(bits=4).codec.value_bits) == (4, 4)
    config = GearConfig(bits=4, value_bits=2)
    assert (config.codec.bits_for("key"), config.codec.bits_for("value")) == (4, 2)
    assert GearConfig(bits=3) == GearConfig(bits=3, key_bits=3)


@pytest.mark.parametrize("method", METHODS)
def test_codec_options_are_read_from_the_codec_only(method):
    """config.codec holds the method's options; GearConfig itself has none of them, so no
    attribute exists for some methods only."""
    config = GearConfig(method=method)
    assert all(hasattr(config.codec, option) for option in CODECS[method].options())
    assert [option for option in option_types() if hasattr(config, option)] == []
    if not config.uses_lowrank:
        assert config.rank(prompt=True) == config.rank(prompt=False) == 0


def test_options_given_reach_the_codec():
    assert GearConfig(method="gear-l", rank_chunk=1).codec.rank_chunk == 1


def test_the_default_dict_keeps_its_old_keys_and_values():
    """lm_eval_gear.gate compares configs by this dict (.ci/gear_baseline.json)."""
    old = {"method": "gear", "bits": 2, "backbone": "kivi", "group_size": 64, "outlier_ratio": 0.02, "rank_prompt": 4,
           "rank_chunk": 2, "power_iters": 3, "buffer_size": 64, "seed": 0, "kernel": "auto"}
    new = {"key_bits": 2, "value_bits": 2, "lowrank_dtype": "fp16", "outlier_dtype": "model", "rotation": "none",
           "sink_tokens": 0}
    assert GearConfig().as_dict() == {**old, **new}


def test_pickles():
    config = GearConfig(method="gear-l", bits=3, lowrank_dtype="int8")
    assert pickle.loads(pickle.dumps(config)) == config


def test_config_error_is_a_value_error():
    assert issubclass(GearConfigError, ValueError)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GearConfig().buffer_size = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        GearConfig().codec.bits = 4


def test_from_options_parses_command_line_strings():
    config = GearConfig.from_options({"method": " GEAR ", "bits": "4", "outlier_ratio": "0.05", "rank_prompt": 0,
                                      "key_bits": 8.0, "lowrank_dtype": "INT8"})
    assert config == GearConfig(method="gear", bits=4, outlier_ratio=0.05, rank_prompt=0, key_bits=8,
                                lowrank_dtype="int8")


def test_from_options_round_trips_as_dict():
    config = GearConfig(method="gear-l", bits=3, backbone="flexgen", group_size=32, seed=7)
    assert GearConfig.from_options(config.as_dict()) == config
    assert set(config.as_dict()) < set(GearConfig.field_names())


BACKBONE_CASES = [(method, backbone) for method in METHODS if "backbone" in CODECS[method].options()
                  for backbone in BACKBONES]


@pytest.mark.parametrize("method, backbone", BACKBONE_CASES)
def test_from_options_round_trips_as_dict_for_every_method_and_backbone(method, backbone):
    config = GearConfig(method=method, backbone=backbone)
    assert GearConfig.from_options(config.as_dict()) == config
    assert GearConfig.from_options(json.loads(json.dumps(config.as_dict()))) == config  # as a results file holds it


@pytest.mark.parametrize("method, backbone", [(m, b) for m, b in BACKBONE_CASES if not QUANTIZERS[b].grouped])
def test_a_backbone_without_groups_takes_no_group_size(method, backbone):
    """kcvt groups keys over the whole chunk and values over the whole vector, turboquant has no
    groups: a group_size would be ignored."""
    sized = " or ".join(b for b in BACKBONES if QUANTIZERS[b].grouped)
    message = (f"GearConfig.group_size=32 is invalid (method {method!r}): backbone {backbone!r} has no groups to "
               f"size, so it takes no group_size; drop it, or use backbone {sized}")
    with pytest.raises(GearConfigError) as raised:
        GearConfig(method=method, backbone=backbone, group_size=32)
    assert str(raised.value) == message
    with pytest.raises(GearConfigError, match=re.escape(message)):
        GearConfig.from_options({"method": method, "backbone": backbone, "group_size": "32"})
    assert GearConfig(method=method, backbone=backbone).codec.group_size is None
    assert GearConfig(method=method, backbone="kcvt") != GearConfig(method=method)  # kivi's group is 64
    assert GearConfig(method=method, backbone="flexgen").codec.group_size == 64


def test_from_options_unknown_key_lists_valid_ones():
    with pytest.raises(GearConfigError, match=re.escape("unknown GEAR option 'bit': valid options are method, bits")):
        GearConfig.from_options({"bit": "2"})


@pytest.mark.parametrize("key, raw", [("bits", "two"), ("outlier_ratio", "2%"), ("group_size", "64.5"), ("bits", "nan")])
def test_from_options_unparsable_value_names_key(key, raw):
    with pytest.raises(GearConfigError, match=re.escape(f"GearConfig.{key}={raw!r} is invalid")):
        GearConfig.from_options({key: raw})
