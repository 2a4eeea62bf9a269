"""lm-eval's RULER tasks under `gear-hf`: the embedded model's tokenizer named for them, the tasks
that need a download stopped offline before the model loads, and niah_single_1 end to end."""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_gear import registration, smollm2

OFFLINE_TASKS = "niah_single_1, niah_multikey_2, niah_multikey_3, ruler_cwe, ruler_fwe, ruler_vt"


@pytest.fixture
def cli_config(monkeypatch, tmp_path):
    """lm-eval's own EvaluatorConfig.from_cli (patched as the start-up hook patches it) on what its
    argument parser makes of the flags; the embedded tokenizer's folder is a stand-in."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    registration.install()
    folder = tmp_path / "embedded-tokenizer"
    monkeypatch.setattr(smollm2, "smollm2_tokenizer_dir", lambda: folder)

    def from_cli(model="gear-hf", model_args=None, metadata=None, tasks="niah_single_1"):
        namespace = argparse.Namespace(model=model, model_args=model_args, metadata=metadata, tasks=tasks)
        return EvaluatorConfig.from_cli(namespace)

    return from_cli, str(folder)


def test_the_embedded_model_s_tokenizer_is_named_when_the_run_names_none(cli_config):
    from_cli, folder = cli_config
    cfg = from_cli(model_args={"method": "kivi", "bits": 4}, metadata={"max_seq_lengths": [512]})
    # the tasks get it; the model's arguments stay as given (it reads its GGUF file)
    assert cfg.metadata == {"method": "kivi", "bits": 4, "max_seq_lengths": [512], "tokenizer": folder}
    assert cfg.model_args == {"method": "kivi", "bits": 4}
    assert from_cli().metadata == {"tokenizer": folder}


@pytest.mark.parametrize(("model_args", "metadata"), [
    ({"pretrained": "/models/mine", "method": "kivi"}, None),
    ({"tokenizer": "/tokenizers/mine"}, None),
    (None, {"tokenizer": "/tokenizers/mine"}),
    (None, {"pretrained": "/models/mine"}),
])
def test_a_tokenizer_or_model_the_run_names_is_left_alone(cli_config, model_args, metadata):
    from_cli, _ = cli_config
    cfg = from_cli(model_args=model_args, metadata=metadata)
    assert cfg.metadata == (model_args or {}) | (metadata or {})


def test_other_models_get_no_tokenizer(cli_config):
    from_cli, _ = cli_config
    assert "tokenizer" not in from_cli(model="hf", model_args={"pretrained": "m"}).metadata
    assert from_cli(model="dummy").metadata == {}


def test_the_embedded_tokenizer_is_saved_once(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    saved = []

    def save(gguf, folder):
        saved.append(gguf)
        folder.mkdir(parents=True)
        (folder / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_save_tokenizer", save)
    first, again = smollm2.smollm2_tokenizer_dir(), smollm2.smollm2_tokenizer_dir()
    assert first == again and first.parent == tmp_path / "lm_eval_gear"
    assert saved == [smollm2.smollm2_dir() / smollm2.GGUF_FILE]


@pytest.mark.slow  # reads the tokenizer out of the GGUF file (seconds)
def test_the_saved_tokenizer_counts_tokens_as_the_model_does(smollm2, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    from lm_eval_gear.smollm2 import smollm2_tokenizer_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, model_tokenizer = smollm2
    saved = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()), trust_remote_code=True)  # as RULER loads it
    text = ("Some special magic numbers are hidden within the following text.\nThe grass is green. The sky is blue. "
            "One of the special magic numbers for humble-otter is: 4817263.\nWhat is it?")
    assert saved(text).input_ids == model_tokenizer(text).input_ids
    assert (saved.eos_token, saved.chat_template) == (model_tokenizer.eos_token, model_tokenizer.chat_template)


def _essays_cached(cache: Path) -> None:
    # as datasets keeps a dataset it has read
    (cache / "baber___paul_graham_essays" / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)


def _nltk_data(monkeypatch, folder: Path, punkt_tab: bool) -> None:
    """nltk looks for its data in `folder` alone, which holds punkt_tab or not."""
    import nltk

    (folder / "tokenizers" / ("punkt_tab" if punkt_tab else "")).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(nltk.data, "path", [str(folder)])


def test_offline_a_ruler_task_that_downloads_names_those_that_do_not(offline_hub, monkeypatch, tmp_path):
    from lm_eval_gear.registration import offline_tasks_problem

    _nltk_data(monkeypatch, tmp_path / "nltk_data", punkt_tab=False)
    assert offline_tasks_problem("niah_single_2") == (
        "niah_single_2 needs Paul Graham's essays (hub dataset baber/paul_graham_essays) and nltk's punkt_tab "
        "(which splits the essays into sentences): downloads that this offline run (HF_HUB_OFFLINE or "
        "HF_DATASETS_OFFLINE) cannot make, and no copy is on this machine; the RULER tasks that run offline are "
        f"{OFFLINE_TASKS} (they build their data locally)"
    )
    both = offline_tasks_problem("niah_single_1,ruler_qa_squad,niah_multivalue")
    assert both.startswith("ruler_qa_squad needs SQuAD (fetched from the web at every run), and niah_multivalue needs "
                           "Paul Graham's essays")
    for group in ("ruler", "longcxt"):  # lm-eval's group and tag of all thirteen
        assert offline_tasks_problem(group).startswith(f"{group} needs Paul Graham's essays (hub dataset "
                                                       "baber/paul_graham_essays), nltk's punkt_tab (which splits the "
                                                       "essays into sentences), SQuAD (fetched from the web at every "
                                                       "run) and HotpotQA (fetched")
    with_twin = offline_tasks_problem("gsm8k_cot,niah_single_3")
    assert with_twin.startswith("gsm8k_cot reads openai/gsm8k") and "; niah_single_3 needs Paul" in with_twin
    for tasks in (OFFLINE_TASKS.replace(" ", ""), "niah_single_1", "arc_easy", None):
        assert offline_tasks_problem(tasks) is None


def test_what_this_machine_holds_is_no_problem(offline_hub, monkeypatch, tmp_path):
    import datasets.config

    from lm_eval_gear.registration import offline_tasks_problem

    _essays_cached(offline_hub)
    _nltk_data(monkeypatch, tmp_path / "nltk_data", punkt_tab=False)
    assert offline_tasks_problem("niah_single_2").startswith("niah_single_2 needs nltk's punkt_tab (which splits")
    _nltk_data(monkeypatch, tmp_path / "nltk_data", punkt_tab=True)
    assert offline_tasks_problem("niah_single_2,niah_multikey_1") is None
    # SQuAD and HotpotQA are fetched at every run: no copy counts
    assert offline_tasks_problem("ruler").startswith(
        "ruler needs SQuAD (fetched from the web at every run) and HotpotQA"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert offline_tasks_problem("ruler") is None


def test_the_cli_stops_an_offline_ruler_download_before_anything_loads(offline_hub, cli_config, monkeypatch, capsys,
                                                                      tmp_path):
    from_cli, _ = cli_config
    _nltk_data(monkeypatch, tmp_path / "nltk_data", punkt_tab=False)
    monkeypatch.setattr(smollm2, "smollm2_tokenizer_dir", lambda: pytest.fail("read the tokenizer of a stopped run"))
    with pytest.raises(SystemExit) as stopped:
        from_cli(tasks="niah_single_2")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lm_eval: error: niah_single_2 needs Paul Graham's essays") and err.count("\n") == 1
    assert f"the RULER tasks that run offline are {OFFLINE_TASKS} " in err


def _lm_eval_ruler_tasks() -> dict[str, dict]:
    """Task name -> config of each task YAML in lm-eval's RULER folder (functions not loaded)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent / "ruler"
    configs = [load_yaml(path, recursive=True, resolve_func=False) for path in sorted(folder.glob("*.yaml"))]
    return {config.get("task") if "group" not in config else config["group"]: config for config in configs}


def _what_it_downloads(custom_dataset: str) -> str:
    """What the function building a RULER task's data reads beyond a tokenizer, from its source:
    'essays' (the essay haystack), 'web' (requests), 'hub' (datasets.load_dataset) or 'nothing'."""
    module, name = custom_dataset.rsplit(".", 1)
    source = Path(module + ".py").read_text()
    (function,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name]
    haystacks = {kw.value.value for node in ast.walk(function) if isinstance(node, ast.Call) for kw in node.keywords
                 if kw.arg == "type_haystack"}
    if haystacks:
        return "essays" if "essay" in haystacks else "nothing"
    return "web" if "requests.get(" in source else "hub" if "load_dataset(" in source else "nothing"


def test_ruler_downloads_are_what_lm_eval_s_tasks_read():
    """RULER_DOWNLOADS holds every RULER task, and says what each downloads as lm-eval's code does."""
    tasks = _lm_eval_ruler_tasks()
    group = tasks.pop("ruler")
    assert set(group["task"]) == set(tasks) == set(registration.RULER_DOWNLOADS)
    assert {"ruler"} | {tag for config in tasks.values() for tag in config["tag"]} == set(registration.RULER_GROUPS)
    expected = {"essays": (registration.ESSAYS, registration.PUNKT_TAB), "nothing": ()}
    for name, config in tasks.items():
        reads = _what_it_downloads(config["custom_dataset"])
        downloads = registration.RULER_DOWNLOADS[name]
        if reads == "web":
            assert downloads in ((registration.SQUAD,), (registration.HOTPOTQA,)), name
        else:
            assert downloads == expected[reads], name


@pytest.mark.slow  # the embedded model generates under the stock lm_eval command
def test_niah_single_1_runs_offline_on_the_embedded_model(tmp_path):
    """benchmarks/lm_eval_ruler.py at 512 tokens: `lm_eval --model gear-hf --model_args <the
    frontier's 3.0-bit pick> --tasks niah_single_1` offline without naming a tokenizer: RULER
    builds its haystacks with the embedded model's, saved once into the cache folder."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("LM_EVAL_GEAR_NO_HOOK", None)
    command = [sys.executable, "-m", "benchmarks.lm_eval_ruler", "--lengths", "512", "--limit", "2", "--tasks",
               "niah_single_1", "--runs", "pick-3.0", "--gen-tokens", "12", "--output", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-6000:]}"
    rows = [line.strip("|").split("|") for line in done.stdout.splitlines() if line.startswith("| 512 ")]
    (row,) = rows
    found, docs = row[3].split("/")
    assert row[1].strip() == "pick-3.0" and 0 <= float(found) <= int(docs) == 2 and float(row[7]) > 0
    assert 2 < float(row[5]) < 32  # the KV bits gear-hf measured
    (path,) = glob.glob(str(tmp_path / "out" / "pick-3.0-512" / "*" / "results_*.json"))
    results = json.loads(Path(path).read_text())
    scores = results["results"]["niah_single_1"]
    assert 0 <= scores["512,none"] <= 1 and scores["4096,none"] == -1  # RULER marks the lengths not asked for
    assert results["n-samples"]["niah_single_1"]["effective"] == 2
    (folder,) = (tmp_path / "cache" / "lm_eval_gear").glob("SmolLM2-135M-Instruct-tokenizer-*")
    assert results["configs"]["niah_single_1"]["metadata"]["tokenizer"] == str(folder)
    picked = json.loads((root / "benchmarks" / "frontier.json").read_text())["budgets"][1]
    assert picked["budget_bits"] == 3.0
    assert {k: results["config"]["gear"]["config"][k] for k in picked["options"]} == picked["options"]
    # the frontier's needle prompts (benchmarks/frontier.py --task niah) are these documents
    sys.path.insert(0, str(root))
    from benchmarks.frontier import niah_prompts

    (samples,) = glob.glob(str(tmp_path / "out" / "pick-3.0-512" / "*" / "samples_niah_single_1_*.jsonl"))
    docs = sorted((json.loads(line) for line in Path(samples).read_text().splitlines()), key=lambda s: s["doc_id"])
    assert niah_prompts(str(folder), 512, 0, 2) == [(d["arguments"]["gen_args_0"]["arg_0"], d["doc"]["outputs"])
                                                    for d in docs]


def test_the_ruler_benchmark_runs_hf_first_and_checks_its_gear_args_before_any_run():
    """benchmarks/lm_eval_ruler.py: --runs in order with hf first, then each --gear-args; a name it
    does not know, or model_args gear-hf would refuse, is a clear error before anything runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.lm_eval_ruler import selected

    named = selected("pick-3.0,hf", ["method=kivi,key_bits=3,value_bits=2"])
    assert list(named) == ["hf", "pick-3.0", "gear-args-1"]
    assert named["gear-args-1"] == ("gear-hf", "method=kivi,key_bits=3,value_bits=2")
    with pytest.raises(ValueError, match="unknown runs pick-9"):
        selected("hf,pick-9", [])
    with pytest.raises(ValueError, match="--gear-args method=kivi,bits=9: .*bits"):
        selected("hf", ["method=kivi,bits=9"])
