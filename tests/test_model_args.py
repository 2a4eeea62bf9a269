"""`gear-hf`'s --model_args: parsing, validation before anything loads, and registration pieces."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from gear_kernels import GearConfig, GearConfigError
from gear_kernels.codecs import CODECS
from lm_eval_gear import registration
from lm_eval_gear.model_args import GEAR_OPTIONS, check_model_args, response_cache_tag, split_model_args
from lm_eval_gear.smollm2 import GGUF_FILE, smollm2_dir

REPO = Path(__file__).resolve().parents[1]


def test_gear_options_are_the_gearconfig_fields():
    assert GEAR_OPTIONS == GearConfig.field_names()
    assert {"method", "bits", "backbone", "group_size", "outlier_ratio", "rank_prompt", "rank_chunk",
            "power_iters", "buffer_size", "seed", "kernel", "key_bits", "value_bits", "lowrank_dtype",
            "outlier_dtype", "rotation", "sink_tokens"} == set(GEAR_OPTIONS)
    assert all(option in GEAR_OPTIONS for codec in CODECS.values() for option in codec.options())


def test_command_line_strings_and_numbers_are_parsed():
    config, rest = split_model_args(
        {"pretrained": "m", "method": "GEAR", "bits": "4", "value_bits": "2.0", "lowrank_dtype": "INT8",
         "backbone": "kcvt", "group_size": 32, "outlier_ratio": "0.05", "rank_prompt": "8", "rank_chunk": 1, "power_iters": "2",
         "buffer_size": "16", "seed": 3, "kernel": "torch", "dtype": "float32", "batch_size": 2}
    )
    assert config == GearConfig(method="gear", bits=4, value_bits=2, lowrank_dtype="int8", backbone="kcvt",
                                group_size=32, outlier_ratio=0.05, rank_prompt=8, rank_chunk=1, power_iters=2, buffer_size=16, seed=3, kernel="torch")
    assert rest == {"pretrained": "m", "dtype": "float32", "batch_size": 2}


def test_defaults_are_gearconfig_defaults():
    config, rest = split_model_args({"pretrained": "m"})
    assert config == GearConfig() and rest == {"pretrained": "m"}


def test_hflm_and_from_pretrained_arguments_pass_through():
    # HFLM's own arguments, and unknown ones HFLM hands to from_pretrained (as --model hf does)
    args = {"pretrained": "m", "parallelize": True, "max_length": 128, "attn_implementation": "eager",
            "low_cpu_mem_usage": True, "trust_remote_code": False}
    assert split_model_args(args)[1] == args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"bits": 5}, "GearConfig.bits=5 is invalid (method 'gear'): allowed one of 2, 3, 4, 8"),
        ({"bits": "two"}, "GearConfig.bits='two' is invalid: allowed a value of type int"),
        ({"method": "gaer"}, "GearConfig.method='gaer' is invalid: allowed one of none, kivi, gear-l, gear"),
        ({"method": None}, "GearConfig.method=None is invalid: allowed one of none, kivi, gear-l, gear"),
        ({"backbone": "per_token"},
         "GearConfig.backbone='per_token' is invalid (method 'gear'): allowed one of kivi, kcvt, flexgen"),
        ({"outlier_ratio": 1.5}, "GearConfig.outlier_ratio=1.5 is invalid (method 'gear'): allowed a number in [0, 1)"),
        ({"group_size": 0}, "GearConfig.group_size=0 is invalid (method 'gear'): allowed an integer >= 1"),
        ({"method": "kivi", "rank_prompt": "8"}, "method 'kivi' does not use rank_prompt; it takes bits, backbone, "
         "group_size, key_bits, value_bits, rotation, sink_tokens, buffer_size, seed, kernel"),
        ({"method": "kivi", "outlier_ratio": 0.1}, "method 'kivi' does not use outlier_ratio; it takes bits, backbone, "
         "group_size, key_bits, value_bits, rotation, sink_tokens, buffer_size, seed, kernel"),
        ({"method": "gear-l", "outlier_dtype": "fp16"}, "method 'gear-l' does not use outlier_dtype; it takes bits, "
         "backbone, group_size, key_bits, value_bits, rotation, sink_tokens, rank_prompt, rank_chunk, power_iters, "
         "lowrank_dtype, buffer_size, seed, kernel"),
        ({"buffer_size": 2.5}, "GearConfig.buffer_size=2.5 is invalid: allowed an integer >= 1"),
        ({"kernel": "cuda"}, "GearConfig.kernel='cuda' is invalid: allowed one of auto, triton, torch"),
    ],
)
def test_bad_values_name_the_option_and_the_choices(args, message):
    with pytest.raises(GearConfigError) as err:
        split_model_args({"pretrained": "m", **args})
    assert str(err.value) == f"gear-hf: invalid --model_args: {message}"


@pytest.mark.parametrize(("key", "hints"), [
    ("bit", ["bits"]), ("metod", ["method"]), ("buffer", ["buffer_size"]), ("outlier_ration", ["outlier_ratio"]),
    ("group", ["group_size"]), ("gear_bits", ["bits"]), ("gear_seeds", []),
    # ambiguous, a typo of a word, names from other KV-cache tools
    ("rank", ["rank_prompt", "rank_chunk"]), ("gear_rank", ["rank_prompt", "rank_chunk"]),
    ("rnak", ["rank_prompt", "rank_chunk"]), ("residual_length", ["buffer_size"]), ("quant_bits", ["bits"]),
    ("nbits", ["bits"]), ("q_group_size", ["group_size"]), ("keep_outlier", ["outlier_ratio", "outlier_dtype"]),
    ("k_bits", ["key_bits"]), ("v_bits", ["value_bits"]), ("lowrank", ["lowrank_dtype"]),
    ("outlier", ["outlier_ratio", "outlier_dtype"]),
])
def test_misspelt_gear_options_are_refused(key, hints):
    with pytest.raises(GearConfigError) as err:
        split_model_args({"pretrained": "m", key: 2})
    text = str(err.value)
    assert f"unknown --model_args option {key!r}" in text
    if hints:
        assert f"(did you mean {' or '.join(map(repr, hints))}?)" in text
    else:
        assert "did you mean" not in text
    assert "the GEAR options are method, bits, backbone, group_size" in text


@pytest.mark.parametrize("key", ["offload_buffers", "use_kernels", "n_group", "topk_group", "rope_scaling",
                                 "sliding_window", "low_cpu_mem_usage", "attn_implementation", "bnb_4bit_quant_type"])
def test_loading_and_config_arguments_are_not_mistaken_for_gear_options(key):
    assert split_model_args({"pretrained": "m", key: 1})[1] == {"pretrained": "m", key: 1}


@pytest.mark.parametrize(("raw", "bits"), [(2.0, 2), (" 2", 2), ("4.0", 4), (8, 8)])
def test_integral_numbers_are_integers(raw, bits):
    """lm-eval parses `bits=2.0` and `bits= 2` into the float 2.0."""
    assert split_model_args({"bits": raw})[0].bits == bits
    assert split_model_args({"buffer_size": raw})[0].buffer_size == bits


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GearConfigError, match="kernel='triton' needs a CUDA device"):
        split_model_args({"pretrained": "m", "kernel": "triton", "device": "cpu"})
    # method none never runs a kernel
    assert split_model_args({"kernel": "triton", "method": "none", "device": "cpu"})[0].kernel == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert split_model_args({"kernel": "triton", "device": "cpu"})[0].kernel == "triton"


def test_embedded_default_needs_no_pretrained():
    assert (smollm2_dir() / GGUF_FILE).is_file()
    assert check_model_args({"method": "kivi"}).method == "kivi"
    with pytest.raises(GearConfigError, match="gguf_file needs pretrained"):
        check_model_args({"gguf_file": "x.gguf"})


class _Loaded(Exception):
    """Raised instead of loading a model."""


def test_gear_hflm_validates_before_loading_and_defaults_to_smollm2(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_gear.model import GearHFLM

    def fake_init(self, pretrained, **kwargs):
        raise _Loaded(pretrained, kwargs)

    monkeypatch.setattr(HFLM, "__init__", fake_init)
    with pytest.raises(GearConfigError, match="bits=3.5"):
        GearHFLM(pretrained="/nonexistent", bits=3.5)
    with pytest.raises(_Loaded) as loaded:
        GearHFLM(method="gear", bits=4, batch_size=2)
    pretrained, kwargs = loaded.value.args
    assert pretrained == str(smollm2_dir())
    assert kwargs == {"gguf_file": GGUF_FILE, "batch_size": 2}  # GEAR options do not reach HFLM


def test_string_model_args_as_from_the_python_api(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_gear.model import GearHFLM

    monkeypatch.setattr(HFLM, "__init__", lambda self, pretrained, **kw: (_ for _ in ()).throw(_Loaded(kw)))
    with pytest.raises(_Loaded) as loaded:
        GearHFLM.create_from_arg_string("pretrained=m,method=kivi,bits=4,dtype=float32", {"device": "cpu"})
    assert loaded.value.args[0] == {"dtype": "float32", "device": "cpu"}


# ------------------------------------------------------------------------------ registration


def test_entry_point_for_newer_lm_eval_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lm_eval.models"] == {"gear-hf": "lm_eval_gear.model:GearHFLM"}
    ours = [ep for ep in importlib.metadata.entry_points(group="lm_eval.models") if ep.name == "gear-hf"]
    assert ours, "lm-eval-gear is not installed: pip install -e ."
    assert ours[0].value == "lm_eval_gear.model:GearHFLM"


def test_register_model_keeps_the_builtins():
    from lm_eval.api.registry import get_model, model_registry

    registration.register_model()
    registration.register_model()  # idempotent
    assert get_model("hf").__name__ == "HFLM"
    assert get_model("gear-hf").__name__ == "GearHFLM"
    assert {"hf", "vllm", "dummy", "steered", "gear-hf"} <= set(model_registry.keys())


def test_tasks_dir_holds_the_gear_tasks():
    folder = registration.tasks_dir()
    assert folder is not None and folder.is_dir()
    if (REPO / "tasks" / "gsm8k_cot_gear.yaml").is_file():
        assert (folder / "gsm8k_cot_gear.yaml").is_file()


def test_task_manager_patch_adds_the_folder_once_and_first():
    seen = []

    class FakeTaskManager:
        def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
            seen.append((include_path, include_defaults))

    registration.patch_task_manager(FakeTaskManager)
    registration.patch_task_manager(FakeTaskManager)  # idempotent
    folder = str(registration.tasks_dir())
    FakeTaskManager()
    FakeTaskManager(include_path="mine")
    FakeTaskManager(None, ["a", "b"], True, {"x": 1})
    FakeTaskManager(include_path=folder)
    FakeTaskManager(include_path="mine", include_defaults=False)
    assert seen == [
        ([folder], True),
        ([folder, "mine"], True),  # --include_path comes later, so it still wins on a name clash
        ([folder, "a", "b"], True),
        ([folder], True),
        ("mine", False),  # no defaults asked for: nothing added
    ]


def test_cli_gives_each_configuration_its_own_response_cache():
    class FakeConfig:
        def __init__(self, model, model_args, use_cache):
            self.model, self.model_args, self.use_cache = model, model_args, use_cache

        @classmethod
        def from_cli(cls, model, model_args, use_cache):
            return cls(model, model_args, use_cache)

    registration.patch_cli_config(FakeConfig)
    two = FakeConfig.from_cli("gear-hf", "pretrained=m,method=gear,bits=2", "out/responses")
    four = FakeConfig.from_cli("gear-hf", {"pretrained": "m", "method": "gear", "bits": 4}, "out/responses")
    other = FakeConfig.from_cli("gear-hf", "pretrained=n,method=gear,bits=2", "out/responses")
    paths = {two.use_cache, four.use_cache, other.use_cache}
    assert len(paths) == 3 and all(p.startswith("out/responses_gear-") for p in paths)
    assert two.use_cache == "out/responses" + response_cache_tag(GearConfig(bits=2), "m")
    assert FakeConfig.from_cli("gear-hf", "pretrained=m,bits=2", two.use_cache).use_cache == two.use_cache
    assert FakeConfig.from_cli("hf", "pretrained=m", "out/responses").use_cache == "out/responses"
    assert FakeConfig.from_cli("gear-hf", "pretrained=m", None).use_cache is None


def test_results_of_the_embedded_model_are_named_after_it():
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    registration.install()  # what the start-up hook does when lm-eval's tracker module loads
    tracker = GeneralConfigTracker()
    tracker.log_experiment_args("gear-hf", "method=gear,bits=2", None, None, False)
    assert tracker.model_name_sanitized == "SmolLM2-135M-Instruct"
    tracker.log_experiment_args("gear-hf", "pretrained=org/model,method=gear", None, None, False)
    assert tracker.model_name_sanitized == "org__model"
    tracker.log_experiment_args("hf", "dtype=float32", None, None, False)
    assert tracker.model_name_sanitized != "SmolLM2-135M-Instruct"  # other models: lm-eval's own naming
