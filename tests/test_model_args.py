"""`gear-hf`'s --model_args: parsing, validation before anything loads, and registration pieces."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch

from gear_kernels import GearConfig, GearConfigError
from gear_kernels.codecs import CODECS
from gear_kernels.quantizers import QUANTIZERS
from lm_eval_gear import registration
from lm_eval_gear.model_args import GEAR_OPTIONS, OPTIONS, check_model_args, response_cache_tag, split_model_args
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
         "backbone": "flexgen", "group_size": 32, "outlier_ratio": "0.05", "rank_prompt": "8", "rank_chunk": 1, "power_iters": "2",
         "buffer_size": "16", "seed": 3, "kernel": "torch", "dtype": "float32", "batch_size": 2}
    )
    assert config == GearConfig(method="gear", bits=4, value_bits=2, lowrank_dtype="int8", backbone="flexgen",
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
         f"GearConfig.backbone='per_token' is invalid (method 'gear'): allowed one of {', '.join(QUANTIZERS)}"),
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


@pytest.mark.parametrize(("args", "message"), [
    ({"attention": "flash"}, "attention='flash' is invalid: allowed auto, rebuilt, packed"),
    ({"attention": "rebuilt", "kernel": "triton"}, "kernel=triton attends straight from the packed cache, "
     "attention=rebuilt through a rebuilt copy: use kernel=auto or torch with it"),
])
def test_bad_attention_paths_are_refused_before_loading(args, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernel=triton passes its own check here
    with pytest.raises(GearConfigError) as err:
        check_model_args({"pretrained": "m", **args})
    assert str(err.value) == f"gear-hf: invalid --model_args: {message}"


@pytest.mark.parametrize(("key", "hints"), [
    ("bit", ["bits"]), ("metod", ["method"]), ("buffer", ["buffer_size"]), ("outlier_ration", ["outlier_ratio"]),
    ("group", ["group_size"]), ("gear_bits", ["bits"]), ("gear_seeds", ["seed"]),
    # ambiguous, a typo of a word, names from other KV-cache tools
    ("rank", ["rank_prompt", "rank_chunk"]), ("gear_rank", ["rank_prompt", "rank_chunk"]),
    ("rnak", ["rank_prompt", "rank_chunk"]), ("residual_length", ["buffer_size"]), ("quant_bits", ["bits"]),
    ("nbits", ["bits"]), ("q_group_size", ["group_size"]), ("keep_outlier", ["outlier_ratio", "outlier_dtype"]),
    ("k_bits", ["key_bits"]), ("v_bits", ["value_bits"]), ("lowrank", ["lowrank_dtype"]),
    ("outlier", ["outlier_ratio", "outlier_dtype"]),
    # inflected: another form of an option's word
    ("rotate", ["rotation"]), ("rotations", ["rotation"]), ("outliers", ["outlier_ratio", "outlier_dtype"]),
    ("sinks", ["sink_tokens"]), ("gear_sinks", ["sink_tokens"]), ("ranks", ["rank_prompt", "rank_chunk"]),
    ("methods", ["method"]), ("bufer_size", ["buffer_size"]), ("outlier_percent", ["outlier_ratio", "outlier_dtype"]),
    ("gear_warp", []),
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
                                 "sliding_window", "low_cpu_mem_usage", "attn_implementation", "bnb_4bit_quant_type",
                                 # near rotate, outliers, sinks, bits, rank or method, yet a model's own
                                 "rotary_dim", "rotary_pct", "rope_theta", "torch_dtype", "partial_rotary_factor",
                                 "attention_bias", "mlp_bias", "key_bias", "kv_lora_rank", "q_lora_rank",
                                 "topk_method", "index_num_sink_tokens", "hc_lowrank", "router_dtype", "mask_token",
                                 "token"])
def test_loading_and_config_arguments_are_not_mistaken_for_gear_options(key):
    assert split_model_args({"pretrained": "m", key: 1})[1] == {"pretrained": "m", key: 1}


def _transformers_argument_names() -> set[str]:
    """Every argument name of every transformers model config class, every keyword from_pretrained
    takes, and bitsandbytes' (HFLM hands those on too): what --model_args may pass through HFLM."""
    import dataclasses

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    classes = [getattr(transformers, name) for name in CONFIG_MAPPING_NAMES.values() if hasattr(transformers, name)]
    classes.append(transformers.BitsAndBytesConfig)
    names = set()
    for cls in classes:
        for klass in cls.__mro__:
            names |= {f.name for f in dataclasses.fields(klass)} if dataclasses.is_dataclass(klass) else set()
            names |= set(getattr(klass, "__annotations__", {}))
            names |= set(inspect.signature(klass.__init__).parameters)
    source = inspect.getsource(transformers.PreTrainedModel.from_pretrained)
    names |= set(re.findall(r"kwargs\.pop\(\s*\"(\w+)\"", source))
    names |= set(inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters)
    return {n for n in names if not n.startswith("_")} - {"self", "args", "kwargs"}


@pytest.mark.slow  # imports every transformers config class
def test_no_transformers_argument_is_mistaken_for_a_gear_option():
    names = _transformers_argument_names()
    assert len(names) > 2000 and {"rotary_dim", "attention_bias", "kv_lora_rank", "offload_buffers"} <= names
    mistaken = {}
    for name in names - set(OPTIONS):  # (backbone, bits, group_size, method and seed are ours too)
        try:
            split_model_args({name: "x"})
        except GearConfigError as exc:
            mistaken[name] = str(exc)
    assert {name: text for name, text in mistaken.items() if "unknown --model_args option" in text} == {}


@pytest.mark.parametrize(("raw", "bits"), [(2.0, 2), (" 2", 2), ("4.0", 4), (8, 8)])
def test_integral_numbers_are_integers(raw, bits):
    """lm-eval parses `bits=2.0` and `bits= 2` into the float 2.0."""
    assert split_model_args({"bits": raw})[0].codec.bits == bits
    assert split_model_args({"buffer_size": raw})[0].buffer_size == bits


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GearConfigError, match="kernel='triton' needs a CUDA device"):
        split_model_args({"pretrained": "m", "kernel": "triton", "device": "cpu"})
    # method none runs no kernel, but asks for one that cannot run here all the same
    with pytest.raises(GearConfigError, match="kernel='triton' needs a CUDA device"):
        split_model_args({"kernel": "triton", "method": "none", "device": "cpu"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert split_model_args({"kernel": "triton", "device": "cpu"})[0].kernel == "triton"


def test_embedded_default_needs_no_pretrained():
    assert (smollm2_dir() / GGUF_FILE).is_file()
    assert check_model_args({"method": "kivi"}).method == "kivi"
    with pytest.raises(GearConfigError, match="gguf_file needs pretrained"):
        check_model_args({"gguf_file": "x.gguf"})


@pytest.mark.parametrize("dtype", ["float64", "double", torch.float64, "int8", "flaot32"])
def test_a_dtype_gear_cannot_compress_is_refused_before_loading(dtype):
    with pytest.raises(GearConfigError) as err:
        check_model_args({"pretrained": "m", "method": "kivi", "dtype": dtype})
    assert str(err.value) == (
        f"gear-hf: invalid --model_args: dtype={dtype} cannot be compressed: GEAR compresses float32, float16, "
        "bfloat16 caches; use one of those, or method=none to run uncompressed"
    )
    assert split_model_args({"method": "none", "dtype": dtype})[1] == {"dtype": dtype}  # nothing to compress


@pytest.mark.parametrize("dtype", ["auto", "float32", "float16", "half", "bfloat16", torch.bfloat16, None])
def test_dtypes_gear_compresses_pass(dtype):
    assert split_model_args({"pretrained": "m", "dtype": dtype})[1]["dtype"] == dtype


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory) -> Path:
    """A Phi-3 config (head_dim 96, not a power of two), no weights: a load would fail on them."""
    from transformers import Phi3Config

    folder = tmp_path_factory.mktemp("phi3")
    Phi3Config(hidden_size=192, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
               num_hidden_layers=1, vocab_size=64).save_pretrained(folder)
    return folder


def test_hadamard_on_a_head_dim_not_a_power_of_two_is_refused_from_the_config(phi3_folder, tmp_path):
    message = ("gear-hf: invalid --model_args: rotation=hadamard needs a power-of-two head_dim, this model has 96: "
               "use rotation=none")
    with pytest.raises(GearConfigError) as err:
        check_model_args({"pretrained": str(phi3_folder), "method": "kivi", "rotation": "hadamard"})
    assert str(err.value) == message
    check_model_args({"pretrained": str(phi3_folder), "method": "kivi"})  # no rotation: fine
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=128, num_attention_heads=2, num_hidden_layers=1).save_pretrained(tmp_path)
    check_model_args({"pretrained": str(tmp_path), "rotation": "hadamard"})  # head_dim 64
    # a config that cannot be read here (offline hub id, missing folder) is left to the load
    check_model_args({"pretrained": str(tmp_path / "missing"), "rotation": "hadamard"})


def test_a_loaded_models_config_is_checked_too(phi3_folder):
    from transformers import AutoConfig

    from lm_eval_gear.model_args import check_model_config

    class Loaded:  # the Python API may pass a model object as pretrained
        config = AutoConfig.from_pretrained(phi3_folder)

    with pytest.raises(GearConfigError, match="this model has 96"):
        check_model_config(GearConfig(rotation="hadamard"), Loaded(), {})


class _Loaded(Exception):
    """Raised instead of loading a model."""


def test_gear_hflm_refuses_hadamard_on_head_dim_96_before_loading(monkeypatch, phi3_folder):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_gear.model import GearHFLM

    monkeypatch.setattr(HFLM, "__init__", lambda self, pretrained, **kw: (_ for _ in ()).throw(_Loaded(kw)))
    with pytest.raises(GearConfigError, match="rotation=hadamard needs a power-of-two head_dim, this model has 96"):
        GearHFLM(pretrained=str(phi3_folder), rotation="hadamard")
    with pytest.raises(_Loaded):
        GearHFLM(pretrained=str(phi3_folder))


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


def test_offline_an_lm_eval_task_with_a_shipped_twin_names_the_twin(offline_hub):
    from lm_eval_gear.registration import offline_tasks_problem

    assert offline_tasks_problem("gsm8k_cot") == (
        "gsm8k_cot reads openai/gsm8k from the Hugging Face hub, which is offline here (HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE) and holds no copy in the local cache: use --tasks gsm8k_cot_gear, its twin shipped "
        "with lm-eval-gear (the same test set, few-shot chain of thought; nothing to download)"
    )
    both = offline_tasks_problem(["gsm8k_cot,arc_easy", "bbh_cot_fewshot_navigate"])
    assert both.startswith("gsm8k_cot reads openai/gsm8k and bbh_cot_fewshot_navigate reads SaylorTwift/bbh from")
    assert "use --tasks gsm8k_cot_gear,arc_easy,bbh_cot_gear_navigate, their twins shipped" in both
    assert "use --tasks bbh_cot_gear," in offline_tasks_problem("bbh_cot_fewshot")  # the group
    # tasks without a shipped twin are lm-eval's business
    for tasks in ("gsm8k", "gsm8k_cot_zeroshot", "gsm8k_cot_gear", "arc_easy", None, []):
        assert offline_tasks_problem(tasks) is None


def test_a_cached_dataset_or_an_online_hub_is_no_problem(offline_hub, monkeypatch):
    import datasets.config

    from lm_eval_gear.registration import offline_tasks_problem

    (offline_hub / "openai___gsm8k" / "main" / "0.0.0" / "0123abcd").mkdir(parents=True)  # as datasets keeps it
    assert offline_tasks_problem("gsm8k_cot") is None
    assert offline_tasks_problem("gsm8k_cot,bbh_cot_fewshot").startswith("bbh_cot_fewshot reads SaylorTwift/bbh")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert offline_tasks_problem("bbh_cot_fewshot") is None


def test_the_cli_stops_an_offline_task_before_anything_loads(offline_hub, capsys):
    class FakeConfig:
        def __init__(self, model, tasks):
            self.model, self.model_args, self.use_cache, self.tasks = model, None, None, tasks

        @classmethod
        def from_cli(cls, model, tasks):
            return cls(model, tasks)

    registration.patch_cli_config(FakeConfig)
    with pytest.raises(SystemExit) as stopped:
        FakeConfig.from_cli("gear-hf", "gsm8k_cot")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("lm_eval: error: gsm8k_cot reads openai/gsm8k from the Hugging Face hub")
    assert FakeConfig.from_cli("gear-hf", "gsm8k_cot_gear").tasks == "gsm8k_cot_gear"


@pytest.mark.slow  # indexes lm-eval's ~15k task YAMLs
def test_hub_twins_are_what_lm_eval_reads():
    """Every lm-eval task with a shipped twin reads the dataset HUB_TWINS names, and every shipped
    task but AQuA (lm-eval has no chain-of-thought AQuA) and the paper's group has its lm-eval twin."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = TaskManager()
    twins = {name: twin for name in manager.all_tasks if (twin := registration._shipped_twin(name))}
    assert {"gsm8k_cot", "bbh_cot_fewshot", "bbh_cot_fewshot_navigate"} <= set(twins)
    for name, (_, dataset) in twins.items():
        path = manager.task_index[name].yaml_path
        config = load_yaml(path, recursive=True, resolve_func=False)
        assert config.get("dataset_path", dataset) == dataset, name  # groups have none
    assert {ours for ours, _ in twins.values()} == registration.shipped_tasks() - {"aqua_cot_gear", "gear_paper"}


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
