"""One stock `lm_eval` run in a subprocess, offline, timed by wall clock and by CPU time.

CPU time (user + system of the lm_eval process) is less sensitive than wall time to other jobs
sharing the machine, so the benchmark tables give both.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time


def run_lm_eval(arguments: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python -m lm_eval ARGUMENTS` -> (the finished process, wall seconds, CPU seconds);
    exits with lm_eval's error output if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-m", "lm_eval", *arguments], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode:
        sys.exit(f"lm_eval {' '.join(arguments)} exited {done.returncode}\n{done.stderr[-3000:]}")
    return done, wall, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
