"""CPU benchmark scripts run end to end in their smoke mode (tiny sizes), so a broken script
fails here rather than when its figures are wanted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_step_smoke():
    run = subprocess.run([sys.executable, "-m", "benchmarks.decode_step", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and all(len(r.split("|")) == 7 for r in rows), run.stdout
