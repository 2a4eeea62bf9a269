"""The README's Python example runs as written (on the embedded model, loaded once per session)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_python_example_runs(smollm2, monkeypatch, capsys):
    import lm_eval_gear.smollm2

    section = README.read_text().split("## Python\n", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    model, tokenizer = smollm2
    monkeypatch.setattr(lm_eval_gear.smollm2, "load_smollm2", lambda: (model, tokenizer))
    monkeypatch.setattr(tokenizer, "padding_side", tokenizer.padding_side)  # the example sets it
    exec(compile(code, str(README), "exec"), {})
    texts, bits = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "5" in texts  # SmolLM2 answers 2 + 3 under 2-bit GEAR
    assert 2 < float(bits) < 32
