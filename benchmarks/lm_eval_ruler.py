"""lm-eval's RULER needle tasks under compression, through the stock CLI (issue 19).

    python -m benchmarks.lm_eval_ruler --lengths 4096,8192 --limit 4
    python -m benchmarks.lm_eval_ruler --runs hf,kivi-2,pick-3.0 --lengths 4096 --attention packed
    python -m benchmarks.lm_eval_ruler --runs hf --gear-args method=kivi,key_bits=3,value_bits=2 --lengths 4096

For each prompt length, runs `lm_eval --tasks niah_single_1,niah_multikey_2` once per
configuration (`--model hf` first, then gear-hf: none, kivi-2, gear-2 and frontier.json's picks)
on SmolLM2-135M-Instruct (the embedded GGUF), offline: RULER builds its haystacks locally with
the model's tokenizer (named in the hf run's metadata; gear-hf runs name none, as a user's
would, and get the embedded model's). Prints, per run: needles found (RULER's string match summed over the
documents), the answers that are the hf run's word for word, the KV bits per element and the
peak working copy from the results JSON, and wall and CPU time against hf (benchmarks.lm_eval_run).
Each length is a run of its own: RULER orders its documents by length, so --limit takes the
first documents of one length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.lm_eval_run import run_lm_eval

TASKS = ("niah_single_1", "niah_multikey_2")  # two of the RULER tasks that need no download
PICKS = Path(__file__).with_name("frontier.json")
FIXED = {"none": "method=none", "kivi-2": "method=kivi,bits=2", "gear-2": "method=gear,bits=2"}


def runs() -> dict[str, tuple[str, str]]:
    """Name -> (lm-eval model, model_args): hf, the fixed gear-hf configs, then frontier.json's picks."""
    from lm_eval_gear.smollm2 import GGUF_FILE, smollm2_dir

    named = {"hf": ("hf", f"pretrained={smollm2_dir()},gguf_file={GGUF_FILE}")}
    named.update({name: ("gear-hf", args) for name, args in FIXED.items()})
    for budget in json.loads(PICKS.read_text())["budgets"]:
        if "options" in budget:
            options = ",".join(f"{k}={v}" for k, v in budget["options"].items())
            named[f"pick-{budget['budget_bits']}"] = ("gear-hf", options)
    return named


def selected(names: str | None, gear_args: list[str]) -> dict[str, tuple[str, str]]:
    """--runs (comma-separated names of runs(); None: all) and --gear-args -> the runs in order,
    hf first; ValueError naming what is unknown or what gear-hf would refuse, before any run."""
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_gear.model_args import check_model_args

    named = runs()
    given = names.split(",") if names else list(named)
    unknown = [n for n in given if n not in named]
    if unknown:
        raise ValueError(f"unknown runs {', '.join(unknown)}: choose from {', '.join(named)}")
    chosen = {n: named[n] for n in ["hf"] * ("hf" in given) + [n for n in given if n != "hf"]}
    for i, model_args in enumerate(gear_args, 1):
        try:
            check_model_args(simple_parse_args_string(model_args))
        except (TypeError, ValueError) as error:
            raise ValueError(f"--gear-args {model_args}: {error}") from None
        chosen[f"gear-args-{i}"] = ("gear-hf", model_args)
    return chosen


def run(name: str, model: str, model_args: str, length: int, args, out: Path) -> dict:
    """One lm_eval run at one length -> each task's per-document scores and answers, the KV
    memory gear-hf reports, wall and CPU time."""
    from lm_eval_gear.smollm2 import smollm2_tokenizer_dir

    if model == "gear-hf" and args.attention != "auto":
        model_args += f",attention={args.attention}"
    out = out / f"{name}-{length}"
    metadata = {"max_seq_lengths": [length]}
    if model == "hf":
        metadata["tokenizer"] = str(smollm2_tokenizer_dir())
    _, wall, cpu = run_lm_eval([
        "--model", model, "--model_args", model_args, "--tasks", ",".join(args.tasks), "--metadata", json.dumps(metadata),
        "--limit", str(args.limit), "--gen_kwargs", f"max_gen_toks={args.gen_tokens}", "--device", "cpu",
        "--batch_size", "1", "--output_path", str(out), "--log_samples"])
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    found, answers = {}, {}
    for task in args.tasks:
        samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        found[task] = [s[str(length)] for s in samples]
        answers[task] = [s["resps"][0][0] for s in samples]
    memory = results["config"].get("gear", {}).get("memory", {})
    return {"found": found, "answers": answers, "bits": memory.get("bits_per_element"),
            "working": memory.get("peak_working_bytes"), "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192", help="comma-separated RULER max_seq_lengths")
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda t: t.split(","), help="RULER tasks that run offline")
    parser.add_argument("--limit", type=int, default=4, help="documents of each task at each length")
    parser.add_argument("--gen-tokens", type=int, default=24, help="max_gen_toks (RULER's own is 128)")
    parser.add_argument("--runs", default=None, help="comma-separated, from: hf (run first; the others are compared "
                        "with it), " + ", ".join(FIXED) + ", pick-<budget> (benchmarks/frontier.json); default all")
    parser.add_argument("--gear-args", action="append", default=[], metavar="MODEL_ARGS",
                        help="also run gear-hf with these model_args (repeatable; named gear-args-1, ...)")
    parser.add_argument("--attention", default="auto", choices=("auto", "rebuilt", "packed"),
                        help="gear-hf's attention option for every gear-hf run")
    parser.add_argument("--output", type=Path, default=None, help="keep each run's lm-eval output here")
    args = parser.parse_args()
    try:
        named = selected(args.runs, args.gear_args)
    except ValueError as error:
        parser.error(str(error))
    chosen = list(named)
    print(f"lm_eval --tasks {','.join(args.tasks)} --limit {args.limit} --gen_kwargs max_gen_toks={args.gen_tokens} "
          f"--batch_size 1, SmolLM2-135M-Instruct (embedded GGUF, fp32, CPU), gear-hf attention={args.attention}\n")
    print("| length | run | model_args | needles found | same answer as hf | KV bits/elem | peak working copy (MiB) "
          "| wall (s) | wall vs hf | CPU (s) | CPU vs hf |")
    print("|---:|---|---|---|---|---|---|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp)
        for length in (int(n) for n in args.lengths.split(",")):
            hf = None
            for name in chosen:
                model, model_args = named[name]
                r = run(name, model, model_args, length, args, out)
                hf = r if name == "hf" else hf
                found = sum(sum(r["found"][t]) for t in args.tasks)
                docs = sum(len(r["found"][t]) for t in args.tasks)
                bits = "-" if r["bits"] is None else f"{r['bits']:.2f}"
                working = "-" if r["working"] is None else f"{r['working'] / 2**20:.1f}"
                shown = "" if name == "hf" else model_args
                if hf is None:
                    same, wall, cpu = "-", "-", "-"
                else:
                    same = f"{sum(a == b for t in args.tasks for a, b in zip(r['answers'][t], hf['answers'][t]))} / {docs}"
                    wall, cpu = f"{r['wall'] / hf['wall']:.2f}", f"{r['cpu'] / hf['cpu']:.2f}"
                print(f"| {length} | {name} | {shown} | {found:g} / {docs} | {same} | {bits} | {working} | "
                      f"{r['wall']:.0f} | {wall} | {r['cpu']:.0f} | {cpu} |", flush=True)


if __name__ == "__main__":
    main()
