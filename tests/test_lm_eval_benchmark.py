"""benchmarks/lm_eval_loglikelihood.py runs end to end, small: two documents of each task on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import build_tiny_lm  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("task", "runs"), [("aqua_mc_gear", "hf,none,gear-2"),
                                           ("gsm8k_rolling_gear", "hf,gear-2")])  # none = hf: once is enough
def test_loglikelihood_benchmark_smoke(tmp_path, task, runs):
    model = build_tiny_lm(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.lm_eval_loglikelihood", "--task", task, "--limit", "2", "--batch-size", "3",
         "--pretrained", str(model), "--runs", runs],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in run.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| run")]
    rows = {cells[0]: dict(zip(("same", "diff", "bits"), cells[2:5])) for cells in table}
    assert list(rows) == runs.split(",")
    if "none" in rows:
        assert rows["none"] == {"same": "1.00", "diff": "0.00e+00", "bits": "-"}  # method none: hf's numbers exactly
    assert float(rows["gear-2"]["diff"]) > 0 and float(rows["gear-2"]["bits"]) < 32  # compressed: moved, and measured
