"""Data, prompts and answer extraction for the GEAR paper's chain-of-thought tasks.

The few-shot exemplars are part of each prompt text, exactly as the paper's code (and
BIG-Bench-Hard) wrote them, so the task YAMLs set num_fewshot: 0 and lm-eval sends
doc_to_text as it is.
"""

import json
import os
import re
from functools import cache
from pathlib import Path

import datasets

PROMPTS = Path(__file__).parent / "prompts"
# the test sets shipped with the package, laid out like ../shared/data (see data/README.md)
PACKAGED_DATA = Path(__file__).parent / "data"
DATA_DIR_ENV = "GEAR_DATA_DIR"
# the value of gear_data_dir or $GEAR_DATA_DIR that reads the HF hub instead of a folder
HUB = "hub"

# A number once commas are gone. A minus counts as a sign only where it does not follow
# a word character, so "2020-2021" gives 2020 and 2021, not -2021.
_NUMBER = re.compile(r"(?:(?<!\w)-)?\d*\.?\d+")
_OPTION_LETTER = re.compile(r"\b[A-E]\b")
_BBH_OPTION = re.compile(r"\([A-Z]\)")


# --- test sets: a folder laid out like ../shared/data (by default the packaged copy), or the
# HF hub when asked for by name
#
# lm-eval calls custom_dataset with every entry of --metadata, the model_args and the
# task's own metadata as keyword arguments; only gear_data_dir is ours, the rest is ignored.


def load_gsm8k(gear_data_dir=None, **_lm_eval_metadata):
    hub = ("openai/gsm8k", "main")
    test = _test_set("gsm8k/test.jsonl", _read_json_lines, hub, gear_data_dir)
    return datasets.DatasetDict(test=test)


def load_aqua(gear_data_dir=None, **_lm_eval_metadata):
    # AQuA's test.json is JSON lines despite its name.
    hub = ("deepmind/aqua_rat", "raw")
    test = _test_set("aqua/test.json", _read_json_lines, hub, gear_data_dir)
    return datasets.DatasetDict(test=test)


def load_bbh(subtask, gear_data_dir=None, **_lm_eval_metadata):
    test = _test_set(
        f"bbh/tasks/{subtask}.json",
        _read_bbh_examples,
        # the BBH copy that lm-eval's own bbh tasks read (lukaemon/bbh needs a loading script)
        ("SaylorTwift/bbh", subtask),
        gear_data_dir,
    )
    # doc_to_text sees only the doc, so the doc names the few-shot prompt it needs.
    return datasets.DatasetDict(test=test.add_column("subtask", [subtask] * len(test)))


def _test_set(relative_path, read, hub, gear_data_dir):
    data_dir, named_by = _data_dir(gear_data_dir)
    if data_dir == HUB:
        return datasets.load_dataset(*hub, split="test")
    path = Path(data_dir).expanduser() / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{named_by} names the data folder {data_dir}, but it has no {relative_path} "
            f"(expected the layout of lm-eval-gear's shared/data: gsm8k/test.jsonl, "
            f"aqua/test.json, bbh/tasks/<name>.json); point gear_data_dir or ${DATA_DIR_ENV} at "
            f"such a folder, leave both unset for the packaged copy, or set one to {HUB!r} for "
            f"the HF hub"
        )
    return datasets.Dataset.from_list(read(path))


def _data_dir(gear_data_dir):
    """The data folder (or HUB) and what named it: the task argument wins over the
    environment variable, and either wins over the packaged copy."""
    if gear_data_dir:
        return gear_data_dir, "the task argument gear_data_dir"
    if os.environ.get(DATA_DIR_ENV):
        return os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    return PACKAGED_DATA, "the default (no gear_data_dir, no $GEAR_DATA_DIR)"


def _read_json_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _read_bbh_examples(path):
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


# --- prompts


@cache
def _prompt_file(name):
    return (PROMPTS / name).read_text(encoding="utf-8")


@cache
def bbh_exemplars(subtask):
    """The official 3-shot CoT prompt, without the canary line and "-----" that open the file."""
    return _prompt_file(f"bbh/{subtask}.txt").split("-----\n", 1)[1]


def gsm8k_prompt(doc):
    return _prompt_file("gsm8k_8shot_cot.txt") + "\nQuestion: " + doc["question"] + "\n"


def aqua_prompt(doc):
    # The exemplars list one option a line ("A)32400"), as the dataset writes them.
    options = "\n".join(doc["options"])
    return (
        _prompt_file("aqua_8shot_cot.txt")
        + "\nQuestion: " + doc["question"]
        + "\nOption:\n" + options
        + "\nLet's think step by step\n"
    )


def bbh_prompt(doc):
    question = "\n\nQ: " + doc["input"] + "\nA: Let's think step by step."
    return bbh_exemplars(doc["subtask"]) + question


# --- answer extraction: None when the generation gives no answer


def gsm8k_answer(generation):
    """The last number before the model moves on to a next question, commas removed."""
    numbers = _NUMBER.findall(generation.split("\nQuestion: ")[0].replace(",", ""))
    return float(numbers[-1]) if numbers else None


def gsm8k_gold(doc):
    return float(doc["answer"].split("#### ")[-1].replace(",", ""))


def aqua_answer(generation):
    """The first option letter on the line after the first "answer is", before the model
    moves on to a next question (the paper's code read past it; see README.md)."""
    _, found, rest = generation.split("\nQuestion:")[0].partition("answer is")
    letter = _OPTION_LETTER.search(rest.lstrip().split("\n")[0]) if found else None
    return letter.group() if letter else None


def bbh_answer(generation):
    """The rest of the line after the last "answer is " before the model moves on to a
    next question, without the sentence's final period; "(B) 12/14/2026" gives "(B)"."""
    _, found, rest = generation.split("\n\nQ: ")[0].rpartition("answer is ")
    if not found:
        return None
    answer = rest.split("\n")[0].strip()
    option = _BBH_OPTION.match(answer)
    return option.group() if option else answer.removesuffix(".")


# --- scoring (process_results): results holds the one greedy generation


def process_gsm8k(doc, results):
    return {"exact_match": float(gsm8k_answer(results[0]) == gsm8k_gold(doc))}


def process_aqua(doc, results):
    return {"exact_match": float(aqua_answer(results[0]) == doc["correct"])}


def process_bbh(doc, results):
    return {"exact_match": float(bbh_answer(results[0]) == doc["target"])}
