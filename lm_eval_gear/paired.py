"""Paired fidelity: how far a compressed gear-hf run is from the exact run of the same model on
the same requests (``--model_args ...,fidelity=true``; DESIGN.md sections 5 and 6).

On a tiny model accuracy is about 0 with or without compression; the distance from the exact
run is what moves, and what a CI gate can hold. gear-hf records, per request, what both runs
gave; :meth:`FidelityRecorder.summary` turns the records into the figures written to
``results["config"]["gear"]["fidelity"]``, overall and per task:

- generate_until: ``tf_kl`` (mean KL(exact || compressed) per token, nats) and ``tf_top1``
  (next-token top-1 agreement), teacher-forced along the exact run's answer, and
  ``answer_agreement`` (share of requests whose generated text equals the exact run's);
- loglikelihood: mean and max absolute difference of the log-likelihoods, agreement of the
  is-greedy flags, and, over the docs with several choices, agreement of the chosen answer
  (the highest log-likelihood, as lm-eval's ``acc``);
- loglikelihood_rolling: mean and max absolute difference of each document's total.

Means are over tokens (tf_*) or requests, so per-task figures weighted by their counts give the
overall ones. Identical runs (method none) give differences 0 and agreements 1 exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Generated:
    """One generate_until request: its teacher-forced sums and whether the texts agree."""

    task: str
    tokens: int
    kl_sum: float
    top1_sum: int
    same_answer: bool


@dataclass(frozen=True)
class Scored:
    """One loglikelihood request (one choice of a doc): exact and compressed (loglik, greedy)."""

    task: str
    doc_id: int
    choice: int
    exact: tuple[float, bool]
    compressed: tuple[float, bool]


@dataclass(frozen=True)
class Rolled:
    """One loglikelihood_rolling request (a document): exact and compressed total loglik."""

    task: str
    exact: float
    compressed: float


@dataclass
class FidelityRecorder:
    """The records of a run (of one rank until merged)."""

    generated: list[Generated] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)
    rolled: list[Rolled] = field(default_factory=list)

    def merge(self, other: FidelityRecorder) -> None:
        self.generated += other.generated
        self.scored += other.scored
        self.rolled += other.rolled

    def __bool__(self) -> bool:
        return bool(self.generated or self.scored or self.rolled)

    def summary(self) -> dict[str, Any]:
        """{"overall": figures, "per_task": {task: figures}}; figures hold only the request types seen."""
        tasks = sorted({r.task for r in (*self.generated, *self.scored, *self.rolled)})
        per_task = {
            task: _figures(
                [r for r in self.generated if r.task == task],
                [r for r in self.scored if r.task == task],
                [r for r in self.rolled if r.task == task],
            )
            for task in tasks
        }
        return {"overall": _figures(self.generated, self.scored, self.rolled), "per_task": per_task}


def _figures(generated: list[Generated], scored: list[Scored], rolled: list[Rolled]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if generated:
        tokens = sum(r.tokens for r in generated)
        out["generate_until"] = {
            "requests": len(generated),
            "tokens": tokens,
            "tf_kl": sum(r.kl_sum for r in generated) / tokens if tokens else None,
            "tf_top1": sum(r.top1_sum for r in generated) / tokens if tokens else None,
            "answer_agreement": _mean([r.same_answer for r in generated]),
        }
    if scored:
        diffs = [abs(r.compressed[0] - r.exact[0]) for r in scored]
        docs: dict[tuple[str, int], list[Scored]] = defaultdict(list)
        for r in scored:
            docs[(r.task, r.doc_id)].append(r)
        choices = [_same_choice(rs) for rs in docs.values() if len(rs) > 1]
        out["loglikelihood"] = {
            "requests": len(scored),
            "docs": len(docs),
            "mean_abs_diff": _mean(diffs),
            "max_abs_diff": max(diffs),
            "greedy_agreement": _mean([r.compressed[1] == r.exact[1] for r in scored]),
            "choice_agreement": _mean(choices) if choices else None,
        }
    if rolled:
        diffs = [abs(r.compressed - r.exact) for r in rolled]
        out["loglikelihood_rolling"] = {"requests": len(rolled), "mean_abs_diff": _mean(diffs), "max_abs_diff": max(diffs)}
    return out


def _same_choice(choices: list[Scored]) -> bool:
    """Whether both runs pick the same choice of a doc (the first of equal highest, as argmax)."""
    ordered = sorted(choices, key=lambda r: r.choice)
    exact = max(range(len(ordered)), key=lambda i: (ordered[i].exact[0], -i))
    compressed = max(range(len(ordered)), key=lambda i: (ordered[i].compressed[0], -i))
    return exact == compressed


def _mean(values: list) -> float:
    return sum(values) / len(values)


def summary_line(fidelity: dict[str, Any]) -> str:
    """One line of the overall figures, printed after gear-hf's memory line."""
    parts = []
    overall = fidelity["overall"]
    if "generate_until" in overall:
        g = overall["generate_until"]
        tf = "no tokens" if g["tf_kl"] is None else f"tf_kl {g['tf_kl']:.4g} tf_top1 {g['tf_top1']:.3f} over {g['tokens']} tokens"
        parts.append(f"generate_until: {tf}, same answer {g['answer_agreement']:.2f} of {g['requests']}")
    if "loglikelihood" in overall:
        s = overall["loglikelihood"]
        choice = "" if s["choice_agreement"] is None else f", same choice {s['choice_agreement']:.2f} of {s['docs']} docs"
        parts.append(
            f"loglikelihood: |diff| mean {s['mean_abs_diff']:.4g} max {s['max_abs_diff']:.4g}, "
            f"greedy flags agree {s['greedy_agreement']:.2f}{choice}"
        )
    if "loglikelihood_rolling" in overall:
        r = overall["loglikelihood_rolling"]
        parts.append(f"loglikelihood_rolling: |diff| per doc mean {r['mean_abs_diff']:.4g} max {r['max_abs_diff']:.4g}")
    return "gear-hf fidelity vs exact: " + ("; ".join(parts) if parts else "no requests")
