"""The Triton kernels compile for a GPU (sm_90, as the H100/H200 the benchmarks run on).

No GPU is needed: `benchmarks/gpu_kernels.py --compile --quick` runs the wrappers with every
kernel launch replaced by a compile of its variant (ttir -> ptx -> cubin with the ptxas that
ships with triton). The interpreter tests cannot catch what only the compiler rejects (loop
-carried types, layouts, register spills that fail to allocate), and GPU time is scarce.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas (no nvidia backend)")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--compile", "--quick"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    compiled = [line for line in run.stdout.splitlines() if line.startswith("compiled ")]
    names = {line.split()[1] for line in compiled}
    assert {"_group_stats_kernel", "_pack_kernel", "_attend_kernel", "_merge_kernel"} <= names, run.stdout
