"""CPU benchmark scripts run end to end in their smoke mode (tiny sizes), so a broken script
fails here rather than when its figures are wanted."""

from __future__ import annotations

import json
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


def test_frontier_smoke(tmp_path):
    """The frontier sweep on SmolLM2 (two configs, two peers, one short prompt): every row
    measured, the picks written as options that GearConfig.from_options builds."""
    from gear_kernels import GearConfig

    picks = tmp_path / "frontier.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--smoke", "--json", str(picks)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = json.loads(picks.read_text())
    assert [b["budget_bits"] for b in written["budgets"]] == [2.5, 3.0, 3.5, 4.5]
    rows = written["rows"]
    assert len(rows) == 4 and all(r["kl"] > 0 and 0 <= r["top1"] <= 1 and r["stored_bits"] > 2 for r in rows.values())
    for budget in written["budgets"]:
        if "options" in budget:
            assert budget["stored_bits"] <= budget["budget_bits"]
            GearConfig.from_options(budget["options"])
