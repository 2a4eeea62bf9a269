"""`gear-hf`'s --model_args: parsing, validation before anything loads, and registration pieces."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from gear_kernels import GearConfig, GearConfigError
from lm_eval_gear import registration
from lm_eval_gear.model_args import GEAR_OPTIONS, check_model_args, split_model_args
from lm_eval_gear.smollm2 import GGUF_FILE, smollm2_dir

REPO = Path(__file__).resolve().parents[1]


def test_gear_options_are_the_gearconfig_fields():
    assert GEAR_OPTIONS == GearConfig.field_names()
    assert {"method", "bits", "backbone", "group_size", "outlier_ratio", "rank_prompt", "rank_chunk",
            "power_iters", "buffer_size", "seed", "kernel"} == set(GEAR_OPTIONS)


def test_command_line_strings_and_numbers_are_parsed():
    config, rest = split_model_args(
        {"pretrained": "m", "method": "GEAR-L", "bits": "4", "backbone": "kcvt", "group_size": 32,
         "outlier_ratio": "0.05", "rank_prompt": "8", "rank_chunk": 1, "power_iters": "2",
         "buffer_size": "16", "seed": 3, "kernel": "torch", "dtype": "float32", "batch_size": 2}
    )
    assert config == GearConfig(method="gear-l", bits=4, backbone="kcvt", group_size=32, outlier_ratio=0.05,
                                rank_prompt=8, rank_chunk=1, power_iters=2, buffer_size=16, seed=3, kernel="torch")
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
        ({"bits": 5}, "GearConfig.bits=5 is invalid: allowed one of 2, 3, 4, 8"),
        ({"bits": "two"}, "GearConfig.bits='two' is invalid: allowed a value of type int"),
        ({"method": "gaer"}, "GearConfig.method='gaer' is invalid: allowed one of none, kivi, gear-l, gear"),
        ({"method": None}, "GearConfig.method=None is invalid: allowed one of none, kivi, gear-l, gear"),
        ({"backbone": "per_token"}, "GearConfig.backbone='per_token' is invalid: allowed one of kivi, kcvt, flexgen"),
        ({"outlier_ratio": 1.5}, "GearConfig.outlier_ratio=1.5 is invalid: allowed a number in [0, 1)"),
        ({"group_size": 0}, "GearConfig.group_size=0 is invalid: allowed an integer >= 1"),
        ({"buffer_size": 2.5}, "GearConfig.buffer_size=2.5 is invalid: allowed an integer >= 1"),
        ({"kernel": "cuda"}, "GearConfig.kernel='cuda' is invalid: allowed one of auto, triton, torch"),
    ],
)
def test_bad_values_name_the_option_and_the_choices(args, message):
    with pytest.raises(GearConfigError) as err:
        split_model_args({"pretrained": "m", **args})
    assert str(err.value) == f"gear-hf: invalid --model_args: {message}"


@pytest.mark.parametrize(("key", "hint"), [("bit", "bits"), ("metod", "method"), ("buffer", "buffer_size"),
                                           ("outlier_ration", "outlier_ratio"), ("group", "group_size"),
                                           ("gear_bits", "bits"), ("gear_rank", None)])
def test_misspelt_gear_options_are_refused(key, hint):
    with pytest.raises(GearConfigError) as err:
        split_model_args({"pretrained": "m", key: 2})
    text = str(err.value)
    assert f"unknown --model_args option {key!r}" in text
    assert (f"did you mean {hint!r}" in text) if hint else "did you mean" not in text
    assert "the GEAR options are method, bits, backbone, group_size" in text


def test_triton_kernel_needs_cuda():
    with pytest.raises(GearConfigError, match="kernel='triton' needs a CUDA device"):
        split_model_args({"pretrained": "m", "kernel": "triton", "device": "cpu"})
    # method none never runs a kernel
    assert split_model_args({"kernel": "triton", "method": "none", "device": "cpu"})[0].kernel == "triton"


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
