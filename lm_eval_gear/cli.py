"""``lm-eval-gear``: keep a gear-hf run's figures as a baseline, and gate a later run on them.

    lm-eval-gear baseline RESULTS -o BASELINE.json
    lm-eval-gear gate RESULTS --baseline BASELINE.json [tolerances]

RESULTS is a results_*.json of ``lm_eval --model gear-hf --model_args ...,fidelity=true`` or
the folder given to its ``--output_path`` (the newest results_*.json under it). Exit status:
0 nothing regressed, 1 something did, 2 the inputs cannot be compared (the message says what
to do). docs/ci_gate.md describes the figures, the rules and the defaults.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .gate import (
    BASELINE_NAME, FAIL, Tolerances, UsageError, compare, find_results, is_results_file, read_baseline, read_json,
    summarize, table, to_json,
)

TOLERANCE_HELP = {
    "kl_rel": "tf_kl may grow to baseline * (1 + KL_REL) + KL_ABS",
    "kl_abs": "in nats, see --kl-rel",
    "logprob_rel": "mean_abs_diff and max_abs_diff may grow to baseline * (1 + LOGPROB_REL) + LOGPROB_ABS",
    "logprob_abs": "in nats, see --logprob-rel",
    "agreement_drop": "tf_top1, greedy_agreement and choice_agreement may fall to baseline - AGREEMENT_DROP",
    "answer_drop": "answer_agreement (free-running generations) may fall to baseline - ANSWER_DROP",
    "bits_abs": "bits_per_element may grow to baseline + BITS_ABS",
    "metric_drop": "gate lm-eval's task metrics too: each may get worse by METRIC_DROP "
    "(without it they are only shown)",
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"lm-eval-gear {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _baseline(args: argparse.Namespace) -> int:
    source = find_results(args.results)
    summary = summarize(read_json(source, "results file"), source)
    if is_results_file(args.output):
        raise UsageError(
            f"{args.output} is an lm-eval results file; writing the baseline there would overwrite it: "
            f"pass another -o, e.g. -o {BASELINE_NAME}"
        )
    try:
        args.output.write_text(to_json(summary), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"lm-eval-gear baseline: wrote {args.output} from {source}")
    return 0


def _gate(args: argparse.Namespace) -> int:
    baseline = read_baseline(args.baseline)
    source = find_results(args.results)
    now = summarize(read_json(source, "results file"), source)
    rows = compare(baseline, now, Tolerances(**{f.name: getattr(args, f.name) for f in fields(Tolerances)}))
    print(f"lm-eval-gear gate: {source} against {args.baseline}")
    print(table(rows))
    return 1 if any(row.verdict == FAIL for row in rows) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-eval-gear",
        description="Keep the figures of a gear-hf run with fidelity=true as a baseline, and gate a "
        "later run on them (exit 0 pass, 1 regression, 2 usage problem). See docs/ci_gate.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    results_help = "a results_*.json of lm_eval --model gear-hf, or its --output_path folder (newest inside)"

    baseline = commands.add_parser("baseline", help="write the figures a gate needs to a baseline file")
    baseline.add_argument("results", type=Path, metavar="RESULTS", help=results_help)
    baseline.add_argument("-o", "--output", type=Path, required=True, metavar="BASELINE.json")
    baseline.set_defaults(run=_baseline)

    gate = commands.add_parser("gate", help="compare a run with a baseline (exit 0 pass, 1 regression, 2 usage)")
    gate.add_argument("results", type=Path, metavar="RESULTS", help=results_help)
    gate.add_argument(
        "--baseline", type=Path, required=True, metavar="BASELINE.json", help="written by lm-eval-gear baseline"
    )
    for field in fields(Tolerances):
        default = "" if field.default is None else f" (default {field.default})"
        help_text = TOLERANCE_HELP[field.name] + default
        gate.add_argument("--" + field.name.replace("_", "-"), type=float, default=field.default, help=help_text)
    gate.set_defaults(run=_gate)
    return parser


if __name__ == "__main__":
    sys.exit(main())
