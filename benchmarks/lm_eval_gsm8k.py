"""The mission's command, measured: `lm_eval --model gear-hf ... --tasks gsm8k_cot_gear` per config.

    python -m benchmarks.lm_eval_gsm8k --limit 50 --batch-size 8

Runs the stock lm_eval CLI once per configuration (none, gear-2, kivi-2, kivi-4, and `--model
hf` for the overhead of gear-hf itself), each on the same questions, and prints accuracy,
answer agreement with method none, the measured KV bits per element from the results JSON,
and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lm_eval_gear.tasks.gear_cot import gsm8k_answer
from benchmarks.smollm2 import DEFAULT_DATA_DIR

RUNS = {  # none first: the others are compared with it
    "none": ("gear-hf", "method=none"),
    "gear-2": ("gear-hf", "method=gear,bits=2"),
    "kivi-2": ("gear-hf", "method=kivi,bits=2"),
    "kivi-4": ("gear-hf", "method=kivi,bits=4"),
    "hf": ("hf", "pretrained={model_dir},gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def run(name: str, limit: int, batch_size: int, data: Path, out: Path) -> dict:
    """One lm_eval run -> its answers, accuracy, KV memory and wall time."""
    from lm_eval_gear.smollm2 import smollm2_dir

    model, args = RUNS[name]
    env = {**os.environ, "GEAR_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args.format(model_dir=smollm2_dir()),
        "--tasks", "gsm8k_cot_gear", "--limit", str(limit), "--batch_size", str(batch_size),
        "--output_path", str(out / name), "--log_samples",
    ]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads(next((out / name).rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((out / name).rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    memory = results["config"].get("gear", {}).get("memory", {})
    return {
        "answers": [gsm8k_answer(s["resps"][0][0]) for s in samples],
        "accuracy": results["results"]["gsm8k_cot_gear"]["exact_match,none"],
        "bits": memory.get("bits_per_element"),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    print(f"lm_eval gsm8k_cot_gear --limit {args.limit} --batch_size {args.batch_size}, SmolLM2-135M-Instruct (fp32)\n")
    print("| run | accuracy | same answer as none | KV bits/elem | wall time (s) | wall vs none |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        none = run("none", args.limit, args.batch_size, args.data, Path(tmp))
        for name in args.runs.split(","):
            r = none if name == "none" else run(name, args.limit, args.batch_size, args.data, Path(tmp))
            same = sum(a == b for a, b in zip(r["answers"], none["answers"])) / len(none["answers"])
            bits = "-" if r["bits"] is None else f"{r['bits']:.2f}"
            print(f"| {name} | {r['accuracy']:.3f} | {same:.2f} | {bits} | {r['wall']:.0f} "
                  f"| {r['wall'] / none['wall']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
