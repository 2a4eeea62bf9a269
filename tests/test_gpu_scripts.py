"""The GPU scripts run end to end in their CPU smoke mode (TRITON_INTERPRET=1, tiny sizes).

Device time is scarce (minutes per task, when a GPU is lent at all), so a script that breaks
must break here first. Each smoke run goes through the same steps as the GPU run: checks
against the torch references, then the timed rows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def smoke(script: str) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_gpu_kernels_smoke():
    out = smoke("gpu_kernels.py")
    assert "| compress kivi 2-bit key" in out and "| decode attention gear 2-bit |" in out
    assert "| attention gear turboquant 3-bit" in out and "| decode attention kivi/turboquant 2-bit |" in out
    assert out.rstrip().endswith("0 failed checks")


def test_gpu_generate_smoke():
    out = smoke("gpu_generate.py")
    rows = [line for line in out.splitlines() if line.startswith(("| exact", "| gear-2"))]
    assert len(rows) == 3, out
    assert out.rstrip().endswith(": ok"), out
