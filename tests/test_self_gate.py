"""The project gates itself: .ci/self_gate runs 2-bit GEAR on the embedded SmolLM2 paired with
the exact run and gates the figures against the committed baseline, so a change that makes the
compression worse (or stores more) fails the test suite, and with it CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_compression_has_not_regressed(tmp_path):
    baseline = json.loads((REPO / ".ci" / "gear_baseline.json").read_text())
    assert baseline["gear_config"]["method"] == "gear" and baseline["gear_config"]["fidelity"] is True
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BIN": str(Path(sys.executable).parent),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", str(REPO / ".ci" / "self_gate")], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    rows = [line for line in done.stdout.splitlines() if "tf_kl" in line or "bits_per_element" in line]
    assert rows and not any("FAIL" in line for line in rows), done.stdout[-6000:]
