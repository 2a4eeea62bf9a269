"""The figures behind ``lm-eval-gear baseline`` and ``lm-eval-gear gate`` (docs/ci_gate.md).

A gear-hf run with ``fidelity=true`` writes, beside lm-eval's own metrics, how far the
compressed run is from the exact one (``results["config"]["gear"]["fidelity"]``). ``summarize``
keeps what a gate needs from such a results file in the shape of the baseline file, so that a
baseline and a new run are compared as two summaries of one shape by ``compare``.

Pure functions on JSON: nothing here imports torch, transformers or lm-eval, so the command
starts fast and runs where none of them is installed.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "lm-eval-gear-baseline"
FORMAT_VERSION = 1
# what fidelity figures are counted over: another --limit or other tasks change these, and
# then the figures say nothing about a regression
COUNTS = ("requests", "docs")
PASS, FAIL, INFO = "ok", "FAIL", "info"
OPERATORS = {"<=": operator.le, ">=": operator.ge, "=": operator.eq}  # NaN meets none of them


# what the messages suggest naming a baseline made from a results file (never the results file)
BASELINE_NAME = "gear_baseline.json"


class UsageError(Exception):
    """The inputs cannot be compared (missing, malformed, another workload): exit 2, not 1."""


@dataclass(frozen=True)
class Tolerances:
    """How far a run may be from its baseline; docs/ci_gate.md says why these defaults."""

    kl_rel: float = 0.2
    kl_abs: float = 0.005
    logprob_rel: float = 0.2
    logprob_abs: float = 0.01
    agreement_drop: float = 0.05
    answer_drop: float = 0.2
    bits_abs: float = 0.05
    metric_drop: float | None = None  # None: task metrics are shown, not gated


@dataclass(frozen=True)
class Row:
    figure: str
    baseline: Any
    now: Any
    allowed: str
    verdict: str


# --- reading


def find_results(path: Path) -> Path:
    """A results file as given, or the newest results_*.json in an lm-eval output folder
    (lm-eval names them results_<start time>.json, so the newest sorts last)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(
            f"{path} does not exist: pass a results_*.json of lm_eval, or the folder given to "
            f"its --output_path"
        )
    found = sorted(path.rglob("results_*.json"), key=lambda p: (p.name, str(p)))
    if not found:
        raise UsageError(
            f"{path} holds no results_*.json: run lm_eval --model gear-hf ... --output_path "
            f"{path} first, or pass the results file itself"
        )
    return found[-1]


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise UsageError(f"the {what} {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"the {what} {path} is not a JSON object")
    return data


def is_results(data: Any) -> bool:
    """Whether parsed JSON is an lm-eval results file (an object with config and results)."""
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("results"), dict)


def is_results_file(path: Path) -> bool:
    """Whether `path` holds an lm-eval results file (False for anything unreadable or else)."""
    try:
        return path.is_file() and is_results(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):  # unreadable, or not JSON
        return False


def summarize(results: dict, source: Path) -> dict:
    """What a gate needs from an lm-eval results dict, as the baseline file holds it."""
    config, metrics = results.get("config"), results.get("results")
    if not is_results(results):
        raise UsageError(
            f"{source} is not an lm-eval results file (no config or results): pass the "
            f"results_*.json that lm_eval --output_path wrote"
        )
    gear = config.get("gear")
    if not isinstance(gear, dict) or not isinstance(gear.get("config"), dict):
        raise UsageError(
            f"{source} has no GEAR figures (config.gear): it was not written by "
            f"lm_eval --model gear-hf"
        )
    if not gear.get("fidelity"):
        raise UsageError(
            f"results file {source} has no fidelity figures: run lm_eval with "
            f"--model_args ...,fidelity=true"
        )
    provenance = ("date", "git_hash", "lm_eval_version", "transformers_version")
    summary = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"results_file": str(source), **{key: results.get(key) for key in provenance}},
        "model": config.get("model_name", config.get("model")),
        "model_args": config.get("model_args"),
        "limit": config.get("limit"),
        "gear_config": gear["config"],
        "bits_per_element": (gear.get("memory") or {}).get("bits_per_element"),
        "fidelity": gear["fidelity"],
        "metrics": {task: _entries(values, _is_metric) for task, values in metrics.items()},
        # lm-eval's direction of each metric (by name, without the filter), for --metric-drop
        "higher_is_better": {
            task: _entries(directions, lambda _, value: _is_bool(value))
            for task, directions in (results.get("higher_is_better") or {}).items()
            if task in metrics
        },
    }
    return check_summary(summary, f"results file {source}")


def _entries(values: Any, keep) -> Any:
    """The entries of one task that keep(key, value) accepts; anything but an object is
    left as it is, for check_summary to name."""
    if not isinstance(values, dict):
        return values
    return {key: value for key, value in values.items() if keep(key, value)}


def _is_metric(key: str, value: Any) -> bool:
    # lm-eval's "metric,filter" numbers, without their stderr (and without alias and the like)
    return "," in key and "_stderr" not in key and _is_number(value)


def read_baseline(path: Path) -> dict:
    data = read_json(path, "baseline")
    remake = f"make one with lm-eval-gear baseline RESULTS -o {path}"
    if data.get("format") != FORMAT and is_results(data):
        # "-o {path}" would overwrite the results with the baseline
        raise UsageError(
            f"{path} is an lm-eval results file, not a baseline: make the baseline from it with "
            f"lm-eval-gear baseline {path} -o {BASELINE_NAME}, then pass --baseline {BASELINE_NAME}"
        )
    if data.get("format") != FORMAT:
        raise UsageError(f'{path} is not a baseline file (no "format": "{FORMAT}"): {remake}')
    if data.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path} is baseline format version {data.get('format_version')}, this lm-eval-gear "
            f"reads version {FORMAT_VERSION}: {remake}"
        )
    return check_summary(data, f"baseline {path}")


def check_summary(summary: dict, where: str) -> dict:
    """The summary itself, once every figure has the shape that compare() reads."""
    problems = []
    fidelity = summary.get("fidelity")
    if isinstance(fidelity, dict):
        overall, per_task = fidelity.get("overall"), fidelity.get("per_task", {})
        problems += _shape_problems("fidelity overall", overall, _is_figure, depth=2)
        problems += _shape_problems("fidelity per_task", per_task, _is_figure, depth=3)
    else:
        problems.append("fidelity is not an object")
    if not isinstance(summary.get("gear_config"), dict):
        problems.append("gear_config is not an object")
    for name in ("bits_per_element", "limit"):
        if not _is_figure(summary.get(name)):
            problems.append(f"{name} is not a number or null")
    problems += _shape_problems("metrics", summary.get("metrics"), _is_number, depth=2)
    problems += _shape_problems("higher_is_better", summary.get("higher_is_better"), _is_bool, depth=2)
    if problems:
        raise UsageError(f"the {where} is malformed: {'; '.join(problems)}")
    return summary


def _shape_problems(name: str, tree: Any, is_leaf, depth: int) -> list[str]:
    """Where `tree`, objects nested `depth` deep, holds anything but is_leaf's leaves."""
    if depth == 0:
        return [] if is_leaf(tree) else [f"{name} is {tree!r}"]
    if not isinstance(tree, dict):
        return [f"{name} is not an object"]
    return [
        problem
        for key, subtree in tree.items()
        for problem in _shape_problems(f"{name} {key}", subtree, is_leaf, depth - 1)
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_figure(value: Any) -> bool:
    # null: not measured in this run (no multiple-choice docs, nothing compressed)
    return value is None or _is_number(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def to_json(summary: dict) -> str:
    """The baseline file: stable and diffable, so that a re-baseline shows what moved."""
    return json.dumps(summary, indent=2, sort_keys=True) + "\n"


# --- comparing


def compare(baseline: dict, now: dict, tolerances: Tolerances) -> list[Row]:
    """One row per figure of the baseline; UsageError when the two runs measured different
    workloads, since their figures then say nothing about a regression."""
    check_same_workload(baseline, now)
    bits = baseline["bits_per_element"]
    bits_limit = None if bits is None else ("<=", bits + tolerances.bits_abs)
    return [
        *_identity_rows(baseline, now),
        _row("bits_per_element", bits, now["bits_per_element"], bits_limit),
        *_fidelity_rows(baseline, now, tolerances),
        *_metric_rows(baseline, now, tolerances),
    ]


def check_same_workload(baseline: dict, now: dict) -> None:
    """UsageError unless both ran the same tasks and request types with the same counts, and
    the results have every figure the baseline has."""
    problems = []
    base_entries, now_entries = _fidelity_entries(baseline), _fidelity_entries(now)
    for where in sorted(base_entries.keys() - now_entries.keys()):
        problems.append(f"{where} is in the baseline only")
    for where in sorted(now_entries.keys() - base_entries.keys()):
        problems.append(f"{where} is in the results only")
    for where in sorted(base_entries.keys() & now_entries.keys()):
        base, current = base_entries[where], now_entries[where]
        for name, value in sorted(base.items()):
            if value is not None and current.get(name) is None:
                problems.append(f"{where} has no {name}")
            elif name in COUNTS and current.get(name) != value:
                problems.append(f"{where} {name}: {value} in the baseline, {current.get(name)} now")
    if baseline["bits_per_element"] is not None and now["bits_per_element"] is None:
        problems.append("bits_per_element was not measured")
    for task, values in sorted(baseline["metrics"].items()):
        for name in sorted(values.keys() - now["metrics"].get(task, {}).keys()):
            problems.append(f"metric {task} {name} is missing")
    if problems:
        tasks = ",".join(sorted(baseline["fidelity"].get("per_task", {})))
        limit = baseline.get("limit")
        raise UsageError(
            "the results do not measure what the baseline did: " + "; ".join(problems)
            + f". Rerun lm_eval with the baseline's --tasks {tasks} and "
            + (f"--limit {limit:g}" if limit is not None else "no --limit")
            + ", or re-baseline with lm-eval-gear baseline RESULTS -o BASELINE"
        )


def _fidelity_entries(summary: dict) -> dict[str, dict]:
    """{"scope/request type": figures}, scope "overall" or a task name."""
    fidelity = summary["fidelity"]
    scopes = {"overall": fidelity["overall"], **fidelity.get("per_task", {})}
    return {
        f"{scope}/{kind}": figures
        for scope, by_type in scopes.items()
        for kind, figures in by_type.items()
    }


def _identity_rows(baseline: dict, now: dict) -> list[Row]:
    """The model and every GEAR config key must be the same: other settings are another
    experiment. A key absent on one side (an older gear-hf) counts as a difference."""
    pairs = [("model", baseline["model"], now["model"])]
    base_config, now_config = baseline["gear_config"], now["gear_config"]
    for key in sorted(base_config.keys() | now_config.keys()):
        pairs.append((f"config/{key}", base_config.get(key, "absent"), now_config.get(key, "absent")))
    return [
        Row(name, base, current, "same", PASS if base == current else FAIL) for name, base, current in pairs
    ]


def _fidelity_rows(baseline: dict, now: dict, tol: Tolerances) -> list[Row]:
    now_entries = _fidelity_entries(now)
    return [
        _row(f"fidelity/{where}/{name}", value, now_entries[where].get(name), _fidelity_limit(name, value, tol))
        for where, figures in _fidelity_entries(baseline).items()
        for name, value in figures.items()
    ]


def _fidelity_limit(name: str, base: float | None, tol: Tolerances) -> tuple[str, float] | None:
    """(operator, bound) that a fidelity figure must meet now; None for one that is only shown
    (a null baseline, the token count, a figure newer than this gate)."""
    if base is None:
        return None
    if name in COUNTS:
        return "=", base  # check_same_workload has made sure
    if name == "tf_kl":
        return "<=", base * (1 + tol.kl_rel) + tol.kl_abs
    if name in ("mean_abs_diff", "max_abs_diff"):
        return "<=", base * (1 + tol.logprob_rel) + tol.logprob_abs
    if name in ("tf_top1", "greedy_agreement", "choice_agreement"):
        return ">=", base - tol.agreement_drop
    if name == "answer_agreement":
        return ">=", base - tol.answer_drop
    return None


def _metric_rows(baseline: dict, now: dict, tol: Tolerances) -> list[Row]:
    return [
        _row(f"metric/{task}/{key}", value, now["metrics"][task][key], _metric_limit(baseline, task, key, tol))
        for task, values in baseline["metrics"].items()
        for key, value in values.items()
    ]


def _metric_limit(baseline: dict, task: str, key: str, tol: Tolerances) -> tuple[str, float] | None:
    """Task metrics are gated only with --metric-drop, in lm-eval's direction (higher is
    better unless lm-eval says otherwise, as for perplexities)."""
    if tol.metric_drop is None:
        return None
    value = baseline["metrics"][task][key]
    if baseline["higher_is_better"].get(task, {}).get(key.split(",")[0], True):
        return ">=", value - tol.metric_drop
    return "<=", value + tol.metric_drop


def _row(figure: str, base: Any, now: Any, limit: tuple[str, float] | None) -> Row:
    if limit is None:
        return Row(figure, base, now, "", INFO)
    op, bound = limit
    return Row(figure, base, now, f"{op} {_fmt(bound)}", PASS if OPERATORS[op](now, bound) else FAIL)


# --- printing

# a long value (a model name) overflows its own line rather than widening every line
VALUE_WIDTH = 12


def table(rows: list[Row]) -> str:
    cells = [("figure", "baseline", "now", "allowed", "verdict")]
    cells += [(r.figure, _fmt(r.baseline), _fmt(r.now), r.allowed, r.verdict) for r in rows]
    widths = [max(len(row[0]) for row in cells), VALUE_WIDTH, VALUE_WIDTH, VALUE_WIDTH, 0]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    failed = [r.figure for r in rows if r.verdict == FAIL]
    gated = sum(r.verdict != INFO for r in rows)
    if failed:
        lines.append(f"gate: FAIL, {len(failed)} of {gated} gated figures regressed: " + ", ".join(failed))
    else:
        lines.append(f"gate: pass, none of {gated} gated figures regressed")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
