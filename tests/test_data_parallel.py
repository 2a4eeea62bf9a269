"""Data parallelism on CPU: the stock `torchrun` launch of `lm_eval --model gear-hf`
(method=gear), two processes over accelerate's gloo process group, against one process.

`ACCELERATE_USE_CPU=1` makes accelerate start that group (without it every process evaluates
everything alone); gear-hf then splits the requests by rank, which HFLM does only when it counts
more than one GPU. The launch writes per-rank logs (`--redirects 3`), where lm-eval's debug log
says how many requests each rank got. Both runs start at once in one module fixture; they are
mostly import time (method=none is left out for that reason: it runs the same launch).

At --batch_size 1 every figure is independent of how the requests are split: with larger
batches the number of caches, the largest one, and the bytes of a prompt that stops before its
batch-mates depend on which prompts share a batch.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from test_cli import GEAR_ARGS, TASKS, _installed_with_hook  # noqa: E402
from tiny_lm import TASKS_DIR, build_tiny_lm, write_task_data  # noqa: E402

pytestmark = pytest.mark.slow

# docs are dealt out round robin (rank r gets docs r, r+2, ...): gen has 5 docs, choice 4 docs of
# 3 options each, rolling 3 texts
SINGLE = {"gear_cli_gen": 5, "gear_cli_choice": 12, "gear_cli_rolling": 3}
RANKS = [
    {"gear_cli_gen": 3, "gear_cli_choice": 6, "gear_cli_rolling": 2},
    {"gear_cli_gen": 2, "gear_cli_choice": 6, "gear_cli_rolling": 1},
]
# rank 1 is one request short in gen and rolling, so lm-eval pads it with a copy of its last
# one (docs 3 and 1); the copy's answer lands in that doc's resps a second time
PADDED = {"gear_cli_gen": {3}, "gear_cli_choice": set(), "gear_cli_rolling": {1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not _installed_with_hook():
        pytest.fail("lm-eval-gear is not pip-installed in this environment: run pip install -e . (or bash .ci/setup)")
    lm_eval, torchrun = (Path(sys.executable).with_name(name) for name in ("lm_eval", "torchrun"))
    for command in (lm_eval, torchrun):
        if not command.exists():
            pytest.fail(f"no {command.name} command next to {sys.executable}: install lm-eval and torch here")
    root = tmp_path_factory.mktemp("dp")
    model = str(build_tiny_lm(root / "model"))
    data = write_task_data(root / "data")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "hf_datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # three processes share the CI's cores
        "MKL_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "LMEVAL_LOG_LEVEL": "DEBUG",  # the per-rank request counts
    }
    env.pop("LM_EVAL_GEAR_NO_HOOK", None)
    evaluate = [
        "--model", "gear-hf", "--model_args", f"pretrained={model},{GEAR_ARGS}",
        "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR), "--device", "cpu",
        "--batch_size", "1", "--log_samples",
    ]
    commands = {
        # --standalone: torchrun picks a free port
        "dp": [
            torchrun, "--standalone", "--nproc_per_node", "2", "--log-dir", root / "logs" / "dp",
            "--redirects", "3", "-m", "lm_eval", *evaluate,
        ],
        "single": [lm_eval, *evaluate],
    }
    logs = root / "logs"
    logs.mkdir()
    procs = {}
    for name, cmd in commands.items():
        cmd += ["--output_path", root / "out" / name]
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            # a session of its own, so that a hung launch is killed with its workers
            procs[name] = subprocess.Popen(
                [str(c) for c in cmd], cwd=data, env=env, stdout=out, stderr=err, start_new_session=True
            )
    deadline = time.monotonic() + 600
    while any(proc.poll() is None for proc in procs.values()):
        if time.monotonic() > deadline:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("lm_eval runs did not finish in 600 s")
        time.sleep(0.2)
    out = {}
    for name, proc in procs.items():
        launcher = (logs / f"{name}.err").read_text()
        # torchrun's workers log to <log-dir>/<run id>/attempt_0/<local rank>/stderr.log
        workers = sorted(glob.glob(str(logs / name / "*" / "attempt_0" / "*" / "stderr.log")))
        out[name] = {
            "rc": proc.returncode,
            "launcher": launcher,
            "stderr": [Path(p).read_text() for p in workers] if name == "dp" else [launcher],
            "out": root / "out" / name,
        }
    return out


def _ok(run: dict) -> None:
    assert run["rc"] == 0, f"exit {run['rc']}\nlauncher:\n{run['launcher'][-3000:]}\n" + "\n".join(
        f"process {i}:\n{err[-4000:]}" for i, err in enumerate(run["stderr"])
    )


def _requests_per_task(log: str) -> dict[str, int]:
    """lm-eval's debug line: 'Task: <name>; number of requests on this rank: <n>'."""
    return {t: int(n) for t, n in re.findall(r"Task: (\S+); number of requests on this rank: (\d+)", log)}


def _results(run: dict) -> dict:
    (path,) = glob.glob(str(run["out"] / "*" / "results_*.json"))  # rank 0 alone writes
    return json.loads(Path(path).read_text())


def _samples(run: dict) -> dict[str, dict[int, tuple]]:
    """task -> {doc_id: (resps, filtered_resps)}."""
    out = {}
    for task in TASKS:
        (path,) = glob.glob(str(run["out"] / "*" / f"samples_{task}_*.jsonl"))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        out[task] = {r["doc_id"]: (r["resps"], r["filtered_resps"]) for r in rows}
        assert len(out[task]) == len(rows)  # each doc once, whichever rank answered it
    return out


def test_two_processes_split_the_requests(runs):
    dp, single = runs["dp"], runs["single"]
    _ok(dp)
    _ok(single)
    assert [_requests_per_task(log) for log in dp["stderr"]] == RANKS
    assert [_requests_per_task(log) for log in single["stderr"]] == [SINGLE]


def test_two_processes_gather_what_one_computes(runs):
    dp, single = runs["dp"], runs["single"]
    _ok(dp)
    _ok(single)
    dp_results, single_results = _results(dp), _results(single)
    assert dp_results["results"] == single_results["results"]

    # the GEAR config and every memory figure, gathered from both ranks on rank 0
    gear = dp_results["config"]["gear"]
    assert gear == single_results["config"]["gear"]
    # counted once each: 5 prompts; 12 choices and 5 windows over the 3 texts
    assert gear["memory"]["sequences"] == {"generate_until": 5, "loglikelihood": 17}

    dp_samples, single_samples = _samples(dp), _samples(single)
    for task in TASKS:
        assert dp_samples[task].keys() == single_samples[task].keys(), task
        for doc_id, (resps, filtered) in single_samples[task].items():
            padded = [r + r for r in resps] if doc_id in PADDED[task] else resps
            assert dp_samples[task][doc_id] == (padded, filtered), (task, doc_id)
