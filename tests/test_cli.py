"""The stock `lm_eval` command with `--model gear-hf`, end to end, in subprocesses, offline.

All lm_eval processes start at once (they are mostly import time) in one module fixture:

* hf:   `--model hf` on a generation, a multiple-choice and a perplexity task (the fixture
        tasks in tests/fixtures/lm_eval_tasks, data written here), --log_samples;
* none: the same with `--model gear-hf --model_args method=none`: identical responses and
        loglikelihoods, and memory figures in the results JSON;
* gear: the same with `method=gear,bits=2` and a small buffer and groups, so the prompt, the
        streamed chunks and the buffer all hold something: the loglikelihoods move, the results
        JSON and the printed summary hold the GEAR config and the measured KV memory; with
        `fidelity=true`, and gear4 the same at 4 bits: the CI gate passes a run against its own
        baseline and fails the 2-bit run against the 4-bit one;
* bad:  `bits=5`: exits at once (before any model loads) with one line naming it; so do
  `method=kivi,rank_prompt=8` (an option kivi does not use), `dtype=float64`, `rotation=hadamard`
  on a Phi-3 config (head_dim 96), and the literal `lm_eval --model gear-hf --tasks gsm8k_cot`
  offline (its hub dataset is not cached: the message names the shipped gsm8k_cot_gear);
* cached2, cached4: the generation task with `--use_cache` on one path at bits 2 and 4: each
        configuration gets its own response-cache file (a rerun then reads it);
* probe: a bare `python` that checks what the start-up hook costs and registers;
* slide_hf, slide_gear: a tiny Mistral whose window (8) is shorter than most contexts, under
  `--model hf` and under 8-bit KIVI, on the multiple-choice and perplexity tasks.

These need the package installed (`pip install -e .` or `pip install .`): that is what puts
`lm_eval_gear_hook.pth` in site-packages and so makes `lm_eval --model gear-hf` work.
"""

from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import Phi3Config

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from tiny_lm import TASKS_DIR, build_tiny_lm, write_task_data  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ["gear_cli_gen", "gear_cli_choice", "gear_cli_rolling"]
SLIDING_TASKS = ["gear_cli_choice", "gear_cli_rolling"]
GEAR_ARGS = "method=gear,bits=2,buffer_size=8,group_size=8"

PROBE = textwrap.dedent(
    """
    import json, sys, time
    ours = ("_lm_eval_gear_hook", "lm_eval_gear", "gear_kernels", "lm_eval", "torch", "transformers")
    out = {"startup_modules": sorted(m for m in sys.modules if m.split(".")[0] in ours)}
    import lm_eval.api.registry as r
    out["registry"] = sorted(r.model_registry.keys())
    out["heavy_after_registry"] = sorted(m for m in ("torch", "transformers", "lm_eval_gear") if m in sys.modules)
    out["hf"] = r.get_model("hf").__name__
    out["gear_hf"] = r.get_model("gear-hf").__name__
    # a plain TaskManager() indexes lm-eval's own tasks, then the GEAR folder; indexing lm-eval's
    # ~15k task YAMLs costs seconds of CPU, so this probe records the paths and skips that one
    from pathlib import Path
    import lm_eval.tasks.manager as manager
    builtin, real_build = Path(manager.__file__).parent, manager.TaskIndex.build
    def build(paths, **kwargs):
        out["indexed"] = [str(p) for p in paths]
        return real_build([p for p in paths if Path(p) != builtin], **kwargs)
    manager.TaskIndex.build = staticmethod(build)
    tm = manager.TaskManager()
    out["builtin_tasks_dir"] = str(builtin)
    out["gear_tasks"] = sorted(t for t in tm.all_tasks if t in ("gsm8k_cot_gear", "aqua_cot_gear", "bbh_cot_gear", "gear_paper"))
    print(json.dumps(out))
    """
)


def _installed_with_hook() -> bool:
    """Whether pip put the start-up hook in this interpreter's site-packages (an editable
    install's source tree also holds an egg-info, so package metadata alone cannot tell)."""
    return any((Path(p) / "lm_eval_gear_hook.pth").is_file() for p in site.getsitepackages())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not _installed_with_hook():
        pytest.fail("lm-eval-gear is not pip-installed in this environment: run pip install -e . (or bash .ci/setup)")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    if not lm_eval.exists():
        pytest.fail(f"no lm_eval command next to {sys.executable}: install lm-eval in this environment")
    root = tmp_path_factory.mktemp("cli")
    model = str(build_tiny_lm(root / "model"))
    sliding = str(build_tiny_lm(root / "sliding", sliding_window=8))
    phi3 = root / "phi3"  # a config (head_dim 96) and no weights: loading it would fail on them
    Phi3Config(hidden_size=192, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
               num_hidden_layers=1, vocab_size=64).save_pretrained(phi3)
    data = write_task_data(root / "data")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(root / "hf_datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        # several processes share the CI's cores; results do not depend on the thread count
        # (all runs use the same), but oversubscription would make them slow
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.pop("LM_EVAL_GEAR_NO_HOOK", None)

    def common(tasks: list[str]) -> list[str]:
        return ["--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "2",
                "--log_samples"]

    commands = {
        "hf": [lm_eval, "--model", "hf", "--model_args", f"pretrained={model}", *common(TASKS)],
        "none": [lm_eval, "--model", "gear-hf", "--model_args", f"pretrained={model},method=none", *common(TASKS)],
        "gear": [lm_eval, "--model", "gear-hf", "--model_args", f"pretrained={model},{GEAR_ARGS},fidelity=true", *common(TASKS)],
        "gear4": [lm_eval, "--model", "gear-hf", "--model_args",
                  f"pretrained={model},{GEAR_ARGS.replace('bits=2', 'bits=4')},fidelity=true", *common(TASKS)],
        "bad": [
            lm_eval, "--model", "gear-hf", "--model_args", "pretrained=/nonexistent/model,bits=5",
            "--tasks", "gear_cli_gen", "--include_path", str(TASKS_DIR),
        ],
        "unused": [
            lm_eval, "--model", "gear-hf", "--model_args", "pretrained=/nonexistent/model,method=kivi,rank_prompt=8",
            "--tasks", "gear_cli_gen", "--include_path", str(TASKS_DIR),
        ],
        "float64": [
            lm_eval, "--model", "gear-hf", "--model_args", "pretrained=/nonexistent/model,method=kivi,dtype=float64",
            "--tasks", "gear_cli_gen", "--include_path", str(TASKS_DIR),
        ],
        "hadamard96": [
            lm_eval, "--model", "gear-hf", "--model_args", f"pretrained={phi3},method=kivi,rotation=hadamard",
            "--tasks", "gear_cli_gen", "--include_path", str(TASKS_DIR),
        ],
        "twin": [lm_eval, "--model", "gear-hf", "--tasks", "gsm8k_cot"],  # as a user types it, offline
        "probe": [sys.executable, "-c", PROBE],
        "slide_hf": [lm_eval, "--model", "hf", "--model_args", f"pretrained={sliding}", *common(SLIDING_TASKS)],
        "slide_gear": [lm_eval, "--model", "gear-hf", "--model_args", f"pretrained={sliding},method=kivi,bits=8,buffer_size=4,"
                       "group_size=8", *common(SLIDING_TASKS)],
    }
    for bits in (2, 4):
        commands[f"cached{bits}"] = [
            lm_eval, "--model", "gear-hf", "--model_args", f"pretrained={model},{GEAR_ARGS.replace('bits=2', f'bits={bits}')}",
            "--tasks", "gear_cli_gen", "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "2",
            "--log_samples", "--use_cache", str(root / "responses"),
        ]
    for name in ("hf", "none", "gear", "gear4", "cached2", "cached4", "slide_hf", "slide_gear"):
        commands[name] += ["--output_path", str(root / "out" / name)]
    logs = root / "logs"
    logs.mkdir()
    procs, seconds = {}, {}
    start = time.perf_counter()
    for name, cmd in commands.items():
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([str(c) for c in cmd], cwd=data, env=env, stdout=out, stderr=err)
    while len(seconds) < len(procs):
        for name, proc in procs.items():
            if name not in seconds and proc.poll() is not None:
                seconds[name] = time.perf_counter() - start
        if time.perf_counter() - start > 900:
            for proc in procs.values():
                proc.kill()
            pytest.fail(f"lm_eval runs did not finish in 900 s (done: {sorted(seconds)})")
        time.sleep(0.1)
    return {
        name: {
            "rc": proc.returncode,
            "stdout": (logs / f"{name}.out").read_text(),
            "stderr": (logs / f"{name}.err").read_text(),
            "seconds": seconds[name],
            "out": root / "out" / name,
            "command": [str(c) for c in commands[name]],
            "cwd": data,
            "env": env,
            "root": root,
        }
        for name, proc in procs.items()
    }


def _ok(run: dict) -> None:
    assert run["rc"] == 0, f"exit {run['rc']}\nstdout:\n{run['stdout'][-3000:]}\nstderr:\n{run['stderr'][-6000:]}"


def _results(run: dict) -> dict:
    (path,) = glob.glob(str(run["out"] / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())


def _samples(run: dict, tasks=TASKS) -> dict[str, list]:
    """task -> [(doc_id, resps, filtered_resps)] sorted by doc_id."""
    out = {}
    for task in tasks:
        (path,) = glob.glob(str(run["out"] / "*" / f"samples_{task}_*.jsonl"))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        out[task] = sorted((r["doc_id"], r["resps"], r["filtered_resps"]) for r in rows)
    return out


def test_gear_hf_method_none_gives_hf_results(runs):
    """Registration leaves `--model hf` working, and method=none reproduces it exactly."""
    _ok(runs["hf"])
    _ok(runs["none"])
    hf, none = _samples(runs["hf"]), _samples(runs["none"])
    for task in TASKS:
        assert len(hf[task]) > 0
        assert none[task] == hf[task], task  # generations and loglikelihoods, bit for bit
    assert _results(runs["none"])["results"] == _results(runs["hf"])["results"]

    gear = _results(runs["none"])["config"]["gear"]
    assert gear["config"]["method"] == "none"
    memory = gear["memory"]
    # under none only generation keeps a KV cache (loglikelihood is HFLM's own batched pass)
    assert memory["sequences"] == {"generate_until": 5}
    assert memory["ratio"] == 1.0 and memory["bytes"]["buffer"] == memory["total_bytes"] > 0
    assert "gear-hf: method=none" in runs["none"]["stdout"]


def test_gear_hf_compresses_every_request_type(runs):
    _ok(runs["gear"])
    results = _results(runs["gear"])
    config = results["config"]
    assert config["model"] == "gear-hf"
    gear = config["gear"]
    assert gear["config"] | {"method": "gear", "bits": 2, "buffer_size": 8, "group_size": 8, "fidelity": True} == gear["config"]
    memory = gear["memory"]
    # generation: 5 prompts (in batches of 2); choice: 4 docs x 3 options; rolling: 3 texts,
    # the last one longer than the model's 256 positions, so in several windows
    assert memory["sequences"]["generate_until"] == 5
    assert memory["sequences"]["loglikelihood"] > 12 + 3
    assert all(memory["bytes"][part] > 0 for part in ("codes", "scales", "outliers", "lowrank", "buffer"))
    assert memory["total_bytes"] == sum(memory["bytes"].values())
    assert memory["dense_bits_per_element"] == 32.0  # the tiny model runs in float32
    assert 2 < memory["bits_per_element"] < 32 and memory["ratio"] > 1
    assert 0 < memory["peak_kv_cache_bytes"] <= memory["total_bytes"]
    # the rebuilt path's working copy: the largest cache's tokens in the model's dtype, at most
    assert 0 < memory["peak_working_bytes"] <= memory["dense_bytes"]
    assert "peak_device_allocated_bytes" in memory  # null on CPU

    # the printed one-line summary
    (line,) = [ln for ln in runs["gear"]["stdout"].splitlines() if ln.startswith("gear-hf: method=gear")]
    assert "bits=2" in line and "bits/element" in line and "lowrank" in line and "peak" in line

    # the compressed cache changed the numbers of every request type
    hf, gear_samples = _samples(runs["hf"]), _samples(runs["gear"])
    for task in TASKS:
        assert gear_samples[task] != hf[task], task


def test_contexts_longer_than_a_sliding_window_are_scored(runs):
    """Loglikelihood requests whose context is longer than the window (8 tokens): the compressed
    cache holds what the window sees, and the answers stay near the exact model's. At 8 bits: this
    model (initializer_range 0.5) moves by several nats at 2 and 4 bits with or without a window,
    while a cache holding the wrong tokens would move it by as much at any width."""
    for name in ("slide_hf", "slide_gear"):
        _ok(runs[name])
    exact, ours = _samples(runs["slide_hf"], SLIDING_TASKS), _samples(runs["slide_gear"], SLIDING_TASKS)
    choice = [(e[1], o[1]) for e, o in zip(exact["gear_cli_choice"], ours["gear_cli_choice"], strict=True)]
    gaps = [abs(float(a[0][0]) - float(b[0][0])) for e, o in choice for a, b in zip(e, o, strict=True)]
    assert 0 < max(gaps) < 1  # compressed, not broken
    memory = _results(runs["slide_gear"])["config"]["gear"]["memory"]
    assert memory["sequences"]["loglikelihood"] > 12 and memory["bits_per_element"] < 32


def test_bad_model_arg_stops_at_once(runs):
    bad = runs["bad"]
    assert bad["rc"] == 2, bad["stderr"][-3000:]
    # named, with the valid choices, in one line, and before the (nonexistent) model was touched
    assert "lm_eval: error: gear-hf: invalid --model_args: GearConfig.bits=5 is invalid (method 'gear'): " \
        "allowed one of 2, 3, 4, 8" in bad["stderr"]
    assert "Traceback" not in bad["stderr"]
    assert "nonexistent" not in bad["stderr"]
    assert bad["seconds"] < min(runs[n]["seconds"] for n in ("hf", "none", "gear"))


def test_option_the_method_does_not_use_stops_at_once(runs):
    unused = runs["unused"]
    assert unused["rc"] == 2, unused["stderr"][-3000:]
    assert "lm_eval: error: gear-hf: invalid --model_args: method 'kivi' does not use rank_prompt; it takes bits, " \
        in unused["stderr"]
    assert "Traceback" not in unused["stderr"] and "nonexistent" not in unused["stderr"]


@pytest.mark.parametrize(("name", "message"), [
    ("float64", "lm_eval: error: gear-hf: invalid --model_args: dtype=float64 cannot be compressed: GEAR compresses "
     "float32, float16, bfloat16 caches; use one of those, or method=none to run uncompressed\n"),
    ("hadamard96", "lm_eval: error: gear-hf: invalid --model_args: rotation=hadamard needs a power-of-two head_dim, "
     "this model has 96: use rotation=none\n"),
    ("twin", "lm_eval: error: gsm8k_cot reads openai/gsm8k from the Hugging Face hub, which is offline here "
     "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and holds no copy in the local cache: use --tasks gsm8k_cot_gear, its "
     "twin shipped with lm-eval-gear (the same test set, few-shot chain of thought; nothing to download)\n"),
])
def test_what_the_config_can_tell_stops_before_the_model_loads(runs, name, message):
    run = runs[name]
    assert run["rc"] == 2, run["stderr"][-3000:]
    assert run["stderr"].endswith(message)
    assert "Traceback" not in run["stderr"] and "Loading weights" not in run["stderr"]
    assert run["seconds"] < min(runs[n]["seconds"] for n in ("hf", "none", "gear"))


def test_startup_hook_is_cheap_and_registers_everything(runs):
    probe = runs["probe"]
    _ok(probe)
    out = json.loads(probe["stdout"].strip().splitlines()[-1])
    # a bare interpreter loads only the hook module: nothing of lm_eval, lm_eval_gear or torch
    assert out["startup_modules"] == ["_lm_eval_gear_hook"]
    # loading lm-eval's registry registers gear-hf next to every built-in, and stays light
    assert {"hf", "hf-auto", "huggingface", "vllm", "dummy", "gear-hf"} <= set(out["registry"])
    assert out["heavy_after_registry"] == []
    assert (out["hf"], out["gear_hf"]) == ("HFLM", "GearHFLM")
    # the GEAR tasks are found without --include_path, indexed after lm-eval's own
    assert out["indexed"][0] == out["builtin_tasks_dir"] and len(out["indexed"]) == 2
    assert Path(out["indexed"][1]).name in ("tasks",)
    if (Path(__file__).resolve().parents[1] / "tasks" / "gsm8k_cot_gear.yaml").is_file():
        assert out["gear_tasks"] == ["aqua_cot_gear", "bbh_cot_gear", "gear_paper", "gsm8k_cot_gear"]


def test_use_cache_keeps_configurations_apart(runs):
    """lm-eval keys cached responses by request alone: each GEAR config gets its own file, so a
    bits=4 run does not report a bits=2 run's answers, and a rerun reads its own."""
    for name in ("cached2", "cached4"):
        _ok(runs[name])
    root = runs["cached2"]["root"]
    files = sorted(p.name for p in root.glob("responses*.db"))
    assert len(files) == 2 and all(f.startswith("responses_gear-") and f.endswith("_rank0.db") for f in files)
    gen = ["gear_cli_gen"]
    # same compression as the uncached run (which also ran the exact model: fidelity=true)
    assert _samples(runs["cached2"], gen) == _samples(runs["gear"], gen)
    assert _samples(runs["cached4"], gen) != _samples(runs["cached2"], gen)
    measured = _results(runs["cached4"])["config"]["gear"]["memory"]
    assert measured["sequences"] == {"generate_until": 5} and measured["response_cache"] in files

    again = dict(runs["cached4"], out=root / "out" / "cached4_again")
    command = again["command"][: again["command"].index("--output_path")] + ["--output_path", str(again["out"])]
    done = subprocess.run(command, cwd=again["cwd"], env=again["env"], capture_output=True, text=True, timeout=600)
    _ok({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
    assert _samples(again, gen) == _samples(runs["cached4"], gen)
    assert _results(again)["config"]["gear"]["memory"]["kv_caches"] == 0
    assert "nothing measured (every response came from lm-eval's response cache)" in done.stdout


def _gate(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lm-eval-gear")
    if not script.exists():
        pytest.fail(f"no lm-eval-gear command next to {sys.executable}: pip install -e .")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_fidelity_figures_and_the_gate_end_to_end(runs, tmp_path):
    """The stock CLI with fidelity=true writes the figures of every request type; a run passes
    the gate against its own baseline, the 2-bit run fails against the 4-bit baseline, and runs
    without fidelity figures cannot be gated."""
    _ok(runs["gear4"])
    two = _results(runs["gear"])["config"]["gear"]["fidelity"]
    four = _results(runs["gear4"])["config"]["gear"]["fidelity"]
    assert set(two["per_task"]) == set(TASKS)
    for kind in ("generate_until", "loglikelihood", "loglikelihood_rolling"):
        assert kind in two["overall"] and kind in four["overall"]
    assert two["overall"]["generate_until"]["tf_kl"] > four["overall"]["generate_until"]["tf_kl"] > 0
    assert two["overall"]["loglikelihood"]["mean_abs_diff"] > four["overall"]["loglikelihood"]["mean_abs_diff"] > 0
    assert "gear-hf fidelity vs exact: generate_until: tf_kl" in runs["gear"]["stdout"]

    for name in ("gear", "gear4"):
        made = _gate("baseline", runs[name]["out"], "-o", tmp_path / f"{name}.json")
        assert made.returncode == 0, made.stderr
    own = _gate("gate", runs["gear"]["out"], "--baseline", tmp_path / "gear.json")
    assert own.returncode == 0, own.stdout + own.stderr
    worse = _gate("gate", runs["gear"]["out"], "--baseline", tmp_path / "gear4.json")
    assert worse.returncode == 1, worse.stdout + worse.stderr
    failed = [line for line in worse.stdout.splitlines() if "FAIL" in line]
    assert any("tf_kl" in line for line in failed) and any("bits" in line for line in failed)
    bare = _gate("gate", runs["none"]["out"], "--baseline", tmp_path / "gear.json")  # gear-hf without fidelity
    assert bare.returncode == 2 and "no fidelity figures" in bare.stderr
    not_ours = _gate("gate", runs["hf"]["out"], "--baseline", tmp_path / "gear.json")
    assert not_ours.returncode == 2 and "not written by lm_eval --model gear-hf" in not_ours.stderr
