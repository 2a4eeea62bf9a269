"""The mission's command, measured: `lm_eval --model gear-hf ... --tasks gsm8k_cot_gear` per config.

    python -m benchmarks.lm_eval_gsm8k --limit 50 --batch-size 8
    python -m benchmarks.lm_eval_gsm8k --limit 20 --fidelity --runs none,kivi-2,gear-2,kivi-4,gear-4

Runs the stock lm_eval CLI once per configuration (none, gear-2, kivi-2, kivi-4, gear-4, and
`--model hf` for the overhead of gear-hf itself), each on the same questions, and prints
accuracy, answer agreement with method none, the measured KV bits per element from the results
JSON, and wall and CPU time (benchmarks.lm_eval_run). With --fidelity every gear-hf run also
has `fidelity=true`, and the table gains gear-hf's own paired figures (teacher-forced KL and
top-1, same answer as the exact run); the first compressed run is then repeated without it, for
what fidelity=true costs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lm_eval_gear.tasks.gear_cot import gsm8k_answer
from benchmarks.lm_eval_run import run_lm_eval
from benchmarks.smollm2 import DEFAULT_DATA_DIR

RUNS = {  # none first: the others are compared with it
    "none": ("gear-hf", "method=none"),
    "gear-2": ("gear-hf", "method=gear,bits=2"),
    "kivi-2": ("gear-hf", "method=kivi,bits=2"),
    "kivi-4": ("gear-hf", "method=kivi,bits=4"),
    "gear-4": ("gear-hf", "method=gear,bits=4"),
    "hf": ("hf", "pretrained={model_dir},gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def run(name: str, limit: int, batch_size: int, data: Path, out: Path, fidelity: bool = False) -> dict:
    """One lm_eval run -> its answers, accuracy, KV memory, fidelity figures, wall and CPU time."""
    from lm_eval_gear.smollm2 import smollm2_dir

    model, args = RUNS[name]
    if fidelity and model == "gear-hf":
        args += ",fidelity=true"
    out = out / f"{name}{'-fidelity' if fidelity else ''}"
    arguments = [
        "--model", model, "--model_args", args.format(model_dir=smollm2_dir()),
        "--tasks", "gsm8k_cot_gear", "--limit", str(limit), "--batch_size", str(batch_size),
        "--output_path", str(out), "--log_samples",
    ]
    _, wall, cpu = run_lm_eval(arguments, {"GEAR_DATA_DIR": str(data)})
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    gear = results["config"].get("gear", {})
    return {
        "answers": [gsm8k_answer(s["resps"][0][0]) for s in samples],
        "accuracy": results["results"]["gsm8k_cot_gear"]["exact_match,none"],
        "bits": gear.get("memory", {}).get("bits_per_element"),
        "fidelity": gear.get("fidelity", {}).get("overall", {}).get("generate_until"),
        "wall": wall,
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--fidelity", action="store_true", help="gear-hf runs with fidelity=true (and its cost)")
    args = parser.parse_args()
    print(f"lm_eval gsm8k_cot_gear --limit {args.limit} --batch_size {args.batch_size}, SmolLM2-135M-Instruct (fp32)\n")
    extra = " tf_kl | tf_top1 | same answer as exact |" if args.fidelity else ""
    print(f"| run | accuracy | same answer as none | KV bits/elem |{extra} wall time (s) | wall vs none "
          "| CPU time (s) | CPU vs none |")
    print("|---|---|---|---|" + "---|" * (3 if args.fidelity else 0) + "---|---|---|---|", flush=True)
    names = args.runs.split(",")
    timed = {}
    with tempfile.TemporaryDirectory() as tmp:
        none = run("none", args.limit, args.batch_size, args.data, Path(tmp), args.fidelity)
        for name in names:
            r = none if name == "none" else run(name, args.limit, args.batch_size, args.data, Path(tmp), args.fidelity)
            timed[name] = r
            same = sum(a == b for a, b in zip(r["answers"], none["answers"])) / len(none["answers"])
            bits = "-" if r["bits"] is None else f"{r['bits']:.2f}"
            print(f"| {name} | {r['accuracy']:.3f} | {same:.2f} | {bits} |{_paired(r) if args.fidelity else ''} "
                  f"{r['wall']:.0f} | {r['wall'] / none['wall']:.2f} | {r['cpu']:.0f} | {r['cpu'] / none['cpu']:.2f} |",
                  flush=True)
        compressed = [n for n in names if n != "none" and RUNS[n][0] == "gear-hf"]
        if args.fidelity and compressed:  # the same run without fidelity=true
            plain = run(compressed[0], args.limit, args.batch_size, args.data, Path(tmp))
            paired = timed[compressed[0]]
            print(f"\nfidelity=true: {compressed[0]} took {paired['wall']:.0f} s ({paired['cpu']:.0f} s CPU), "
                  f"{plain['wall']:.0f} s ({plain['cpu']:.0f} s CPU) without it: {paired['wall'] / plain['wall']:.2f}x "
                  f"wall, {paired['cpu'] / plain['cpu']:.2f}x CPU")


def _paired(r: dict) -> str:
    """The fidelity columns of a run: tf_kl, tf_top1, answer agreement with the exact run."""
    f = r["fidelity"] or {}
    cells = ["-" if f.get(k) is None else f"{f[k]:.4f}" if k == "tf_kl" else f"{f[k]:.3f}"
             for k in ("tf_kl", "tf_top1", "answer_agreement")]
    return " " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
