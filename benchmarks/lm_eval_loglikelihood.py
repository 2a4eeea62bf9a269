"""Loglikelihood requests through the stock CLI, per model config.

    python -m benchmarks.lm_eval_loglikelihood --limit 40 --batch-size 8
    python -m benchmarks.lm_eval_loglikelihood --task gsm8k_rolling_gear --limit 8 --batch-size 8

Runs `lm_eval` once per configuration (`--model hf`, then gear-hf method=none, gear-2, kivi-2),
one after the other on the same documents of one task: `aqua_mc_gear`, AQuA questions as 5-way
multiple choice (loglikelihood), or `gsm8k_rolling_gear`, the perplexity of GSM8K's 8-shot CoT
prompts with their answers (loglikelihood_rolling, ~900 tokens a document); both in
benchmarks/tasks. Prints the task's metric, agreement with hf (chosen answers, largest
loglikelihood difference), the measured KV bits per element, and wall and CPU time (of the
lm_eval process, less sensitive to other jobs on the machine), each with its ratio to hf's in the
same run. Without --pretrained the model is the embedded SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.lm_eval_run import run_lm_eval

METRICS = {"aqua_mc_gear": "acc,none", "gsm8k_rolling_gear": "word_perplexity,none"}  # task -> its metric
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RUNS = {  # hf first: the others are compared with it
    "hf": ("hf", ""),
    "none": ("gear-hf", "method=none"),
    "gear-2": ("gear-hf", "method=gear,bits=2"),
    "kivi-2": ("gear-hf", "method=kivi,bits=2"),
}


def model_args(name: str, pretrained: str | None) -> tuple[str, str]:
    """(--model, --model_args) of a run; gear-hf without pretrained loads the embedded model itself."""
    model, gear = RUNS[name]
    if pretrained is not None:
        where = f"pretrained={pretrained}"
    elif model == "hf":
        from lm_eval_gear.smollm2 import GGUF_FILE, smollm2_dir

        where = f"pretrained={smollm2_dir()},gguf_file={GGUF_FILE}"
    else:
        where = ""
    return model, ",".join(part for part in (where, gear) if part)


def run(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One lm_eval run -> its per-doc loglikelihoods, the task's metric, KV bits, wall and CPU time."""
    model, margs = model_args(name, args.pretrained)
    arguments = [
        "--model", model, "--tasks", args.task, "--include_path", str(TASKS_DIR),
        "--limit", str(args.limit), "--batch_size", str(args.batch_size), "--device", "cpu",
        "--output_path", str(out / name), "--log_samples",
    ] + (["--model_args", margs] if margs else [])
    _, wall, cpu = run_lm_eval(arguments)
    results = json.loads(next((out / name).rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((out / name).rglob(f"samples_{args.task}_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    memory = results["config"].get("gear", {}).get("memory", {})
    return {
        "loglik": [[_loglik(choice) for choice in s["resps"]] for s in samples],  # doc -> choice (or window) -> ll
        "metric": results["results"][args.task][METRICS[args.task]],
        "bits": memory.get("bits_per_element"),
        "wall": wall,
        "cpu": cpu,
    }


def _loglik(response: list) -> float:
    """A response as logged: [[ll, is_greedy]] for a choice, [ll] for a rolling document."""
    first = response[0]
    return float(first[0] if isinstance(first, list) else first)


def chosen(loglik: list[float]) -> int:
    return max(range(len(loglik)), key=loglik.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="aqua_mc_gear", choices=sorted(METRICS))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", default="8", help="as lm_eval's --batch_size (N or auto)")
    parser.add_argument("--pretrained", help="a model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from " + ", ".join(RUNS))
    parser.add_argument("--output-path", type=Path, help="keep each run's lm_eval output here (default: a temporary folder)")
    args = parser.parse_args()
    names = args.runs.split(",")
    if names[0] != "hf" or set(names) - set(RUNS):
        parser.error(f"--runs: names from {', '.join(RUNS)}, hf first")
    print(f"lm_eval --tasks {args.task} --limit {args.limit} --batch_size {args.batch_size}, "
          f"{args.pretrained or 'SmolLM2-135M-Instruct (embedded)'}\n")
    print(f"| run | {METRICS[args.task].split(',')[0]} | same choice as hf | max abs loglik diff vs hf | KV bits/elem | wall time (s) | wall vs hf "
          "| CPU time (s) | CPU vs hf |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = None
        for name in names:
            r = run(name, args, args.output_path or Path(tmp))
            hf = hf or r
            pairs = list(zip(r["loglik"], hf["loglik"], strict=True))
            same = sum(chosen(a) == chosen(b) for a, b in pairs) / len(pairs)
            diff = max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True))
            bits = "-" if r["bits"] is None else f"{r['bits']:.2f}"
            print(f"| {name} | {r['metric']:.3f} | {same:.2f} | {diff:.2e} | {bits} | {r['wall']:.0f} "
                  f"| {r['wall'] / hf['wall']:.2f} | {r['cpu']:.0f} | {r['cpu'] / hf['cpu']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
