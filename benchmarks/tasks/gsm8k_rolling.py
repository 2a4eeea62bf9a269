"""Helpers of gsm8k_rolling_gear.yaml: a document is the GEAR paper's 8-shot prompt for a test
question, followed by that question's worked answer."""

from lm_eval_gear.tasks.gear_cot import gsm8k_prompt, load_gsm8k  # noqa: F401  (the packaged test set by default)


def document(doc):
    return gsm8k_prompt(doc) + "Answer: " + doc["answer"]
