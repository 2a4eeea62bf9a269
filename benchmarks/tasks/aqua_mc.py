"""Helpers of aqua_mc_gear.yaml: AQuA's options ("A)36") as choices, the correct one's index."""

from lm_eval_gear.tasks.gear_cot import load_aqua  # noqa: F401  (the packaged test set by default)

LETTERS = "ABCDE"


def choices(doc):
    return [" " + option.split(")", 1)[1] for option in doc["options"]]


def target(doc):
    return LETTERS.index(doc["correct"])
