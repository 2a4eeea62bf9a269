"""The GEAR paper's task YAMLs in tasks/: answer extraction, and lm-eval building them offline."""

import hashlib
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
from lm_eval.api.model import LM
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"

# gear_cot.py is not a package module: lm-eval imports it by path (`!function`), so do we.
_spec = importlib.util.spec_from_file_location("gear_cot", TASKS / "gear_cot.py")
gear_cot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gear_cot)

BBH_SUBTASKS = sorted(p.stem for p in (TASKS / "prompts" / "bbh").glob("*.txt"))
# BBH tasks hold 250 examples, except these three
BBH_SIZES = {"causal_judgement": 187, "penguins_in_a_table": 146, "snarks": 178}


def _no_hub(*args, **kwargs):
    raise AssertionError(f"tried the HF hub: {args}")


@pytest.fixture(scope="module")
def offline_data(data_dir):
    """GEAR_DATA_DIR names the data folder, and any attempt to reach the HF hub fails."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEAR_DATA_DIR", str(data_dir))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        # datasets reads those two once, on import; this catches any hub access for sure
        mp.setattr(datasets, "load_dataset", _no_hub)
        yield data_dir


@pytest.fixture(scope="module")
def paper_tasks(offline_data):
    """lm-eval's TaskManager on tasks/, and every leaf task of gear_paper it built."""
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    return manager, manager.load(["gear_paper"])


# --- answer extraction on hand-written generations


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("He has 3 + 2 = 5 toys.\nThe answer is 5.", 5.0),
        ("So she paid 1,234 dollars.\nThe answer is 1,234.", 1234.0),
        ("The temperature fell to -7 degrees.\nThe answer is -7.", -7.0),
        ("Each costs $3.50.\nThe answer is 3.50.", 3.5),
        ("The answer is .5 of the cake.", 0.5),
        ("From 2020-2021 it grew by 12 percent.", 12.0),
        ("In 2020-2021 it grew.", 2021.0),  # a hyphen between numbers is no minus sign
        ("I do not know.", None),
        ("", None),
        ("The answer is 8.\nQuestion: Tom has 12 apples.\nThe answer is 12.", 8.0),
        ("The answer is 8.\n\nQuestion: Tom has 12 apples.", 8.0),
        ("\nQuestion: Tom has 12 apples.", None),
    ],
)
def test_gsm8k_answer(generation, answer):
    assert gear_cot.gsm8k_answer(generation) == answer


def test_gsm8k_scores_as_float_against_gold_after_hashes():
    doc = {"answer": "She earns 3 * 1,000 = <<3*1000=3000>>3,000.50\n#### 3,000.5"}
    assert gear_cot.process_gsm8k(doc, ["So 3000.50 dollars.\nThe answer is 3,000.50."]) == {
        "exact_match": 1.0
    }
    assert gear_cot.process_gsm8k(doc, ["The answer is 3000.\nQuestion: 3000.5"]) == {
        "exact_match": 0.0
    }


@pytest.mark.parametrize(
    "generation, letter",
    [
        ("900 * 0.6 = 540.\nThe answer is D).", "D"),
        ("The answer is (B) 250 m.", "B"),
        ("The answer is option C", "C"),
        ("The answer is: E", "E"),
        ("The answer is A). Or the answer is B).", "A"),  # the first "answer is"
        ("The answer is\nC)", "C"),
        ("The answer is 540 miles.\nSo C) is closest.", None),  # only the line after "answer is"
        ("Eighty is the answer.", None),
        ("So x = 250.\nQuestion: Which?\nThe answer is B).", None),
    ],
)
def test_aqua_answer(generation, letter):
    assert gear_cot.aqua_answer(generation) == letter


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("So the answer is (A).", "(A)"),
        ("So the answer is (B) 12/14/2026.", "(B)"),
        ("not True is False. So the answer is True.", "True"),
        ("So the answer is valid.", "valid"),
        ("So the answer is invalid.", "invalid"),
        ("So the answer is ] ) }.", "] ) }"),
        ("So the answer is apple banana cherry.", "apple banana cherry"),
        ("So the answer is Monsters, Inc.", "Monsters, Inc"),
        ("So the answer is -219.", "-219"),
        ("The answer is (A). Wait, the answer is (C).", "(C)"),  # the last "answer is"
        ("So the answer is Yes.\nSome afterthought.", "Yes"),
        ("So the answer is No.\n\nQ: Is it?\nA: So the answer is Yes.", "No"),
        ("I am not sure.", None),
        ("\n\nQ: Is it?\nA: So the answer is Yes.", None),
    ],
)
def test_bbh_answer(generation, answer):
    assert gear_cot.bbh_answer(generation) == answer


def test_bbh_scores_exact_match_with_target():
    assert gear_cot.process_bbh({"target": "(C)"}, ["So the answer is (C)."])["exact_match"] == 1.0
    assert gear_cot.process_bbh({"target": "yes"}, ["So the answer is Yes."])["exact_match"] == 0.0


# --- lm-eval finds the tasks and builds them offline


def test_task_manager_finds_the_tasks():
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    for name in ["gsm8k_cot_gear", "aqua_cot_gear", "bbh_cot_gear", "gear_paper"]:
        assert name in manager.all_tasks
    assert len(BBH_SUBTASKS) == 27
    assert {f"bbh_cot_gear_{s}" for s in BBH_SUBTASKS} <= set(manager.all_subtasks)


def test_groups(paper_tasks):
    _, loaded = paper_tasks
    assert loaded["group_map"]["gear_paper"] == ["gsm8k_cot_gear", "aqua_cot_gear", "bbh_cot_gear"]
    assert loaded["group_map"]["bbh_cot_gear"] == [f"bbh_cot_gear_{s}" for s in BBH_SUBTASKS]
    (aggregate,) = loaded["groups"]["bbh_cot_gear"].aggregate_metric_list
    assert (aggregate.metric, aggregate.weight_by_size) == ("exact_match", False)  # macro average


def test_doc_counts(paper_tasks):
    tasks = paper_tasks[1]["tasks"]
    assert len(tasks["gsm8k_cot_gear"].eval_docs) == 1319
    assert len(tasks["aqua_cot_gear"].eval_docs) == 254
    for subtask in BBH_SUBTASKS:
        assert len(tasks[f"bbh_cot_gear_{subtask}"].eval_docs) == BBH_SIZES.get(subtask, 250)


def _first_request(task):
    task.build_all_requests(limit=1, rank=0, world_size=1)
    context, gen_kwargs = task.instances[0].args
    return task.eval_docs[0], context, gen_kwargs


def test_gsm8k_prompt(paper_tasks, data_dir):
    doc, context, gen_kwargs = _first_request(paper_tasks[1]["tasks"]["gsm8k_cot_gear"])
    exemplars = (data_dir / "prompts" / "gsm8k_8shot_cot.txt").read_text(encoding="utf-8")
    assert exemplars.count("\nLet's think step by step\n") == 8
    assert context == exemplars + "\nQuestion: " + doc["question"] + "\n"
    assert doc["question"].startswith("Janet")
    assert gen_kwargs["until"] == ["\nQuestion:"] and gen_kwargs["max_gen_toks"] == 256


def test_aqua_prompt(paper_tasks, data_dir):
    doc, context, gen_kwargs = _first_request(paper_tasks[1]["tasks"]["aqua_cot_gear"])
    exemplars = (data_dir / "prompts" / "aqua_8shot_cot.txt").read_text(encoding="utf-8")
    assert exemplars.count("\nOption:\nA)") == 8  # options one a line, as this prompt joins them
    assert context.startswith(exemplars + "\nQuestion: " + doc["question"] + "\nOption:\nA)5(")
    assert context.endswith("\nD)8(√3 – 2)\nE)None of these\nLet's think step by step\n")
    assert gen_kwargs["max_gen_toks"] == 196


def test_bbh_prompts(paper_tasks, data_dir):
    tasks = paper_tasks[1]["tasks"]
    for subtask in BBH_SUBTASKS:
        doc, context, gen_kwargs = _first_request(tasks[f"bbh_cot_gear_{subtask}"])
        official = (data_dir / "bbh" / "cot-prompts" / f"{subtask}.txt").read_text(encoding="utf-8")
        canary, separator, exemplars = official.split("\n", 2)
        assert "canary" in canary and separator == "-----"
        assert exemplars.count("\nA: Let's think step by step.") == 3
        assert context == exemplars + "\n\nQ: " + doc["input"] + "\nA: Let's think step by step."
        assert doc["input"] == _bbh_examples(data_dir, subtask)[0]["input"]
        assert gen_kwargs["max_gen_toks"] == 256


def _bbh_examples(data_dir, subtask):
    return json.loads((data_dir / "bbh" / "tasks" / f"{subtask}.json").read_text())["examples"]


def _recorded_digests() -> dict[str, str]:
    """Reference path (as in ../shared/data) -> sha256, recorded from the reference copies."""
    lines = (REPO / "tests" / "fixtures" / "reference_data.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prompts_are_unchanged_copies():
    recorded = _recorded_digests()
    copies = {**{f"prompts/{f.name}": f for f in (TASKS / "prompts").glob("*.txt")},
              **{f"bbh/cot-prompts/{f.name}": f for f in (TASKS / "prompts" / "bbh").glob("*.txt")}}
    assert len(copies) == 2 + 27
    for reference, copy in copies.items():
        assert _sha256(copy) == recorded[reference], copy


def _json_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_packaged_test_sets_are_unchanged_copies():
    packaged = TASKS / "data"
    copies = [
        "gsm8k/test.jsonl", "gsm8k/LICENSE", "aqua/test.json", "aqua/LICENSE", "bbh/LICENSE",
        *(f"bbh/tasks/{s}.json" for s in BBH_SUBTASKS),
    ]
    recorded = _recorded_digests()
    for name in copies:
        assert _sha256(packaged / name) == recorded[name], name
    shipped = {str(p.relative_to(packaged)) for p in packaged.rglob("*") if p.is_file()}
    assert shipped == {*copies, "README.md"}  # the test sets only, and their provenance


def test_the_recorded_digests_are_the_reference_copies():
    """The digests the two tests above hold the copies to are those of ../shared/data, where
    it sits beside the clone (as in CI); a clone with nothing beside it has only the record."""
    reference = REPO.parent / "shared" / "data"
    if not reference.is_dir():
        pytest.skip(f"the reference copies ({reference}) are not beside this clone")
    for name, digest in _recorded_digests().items():
        assert _sha256(reference / name) == digest, name


def test_tasks_read_the_packaged_copy_by_default(monkeypatch, data_dir):
    monkeypatch.delenv("GEAR_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    tasks = manager.load(["gsm8k_cot_gear", "aqua_cot_gear", "bbh_cot_gear_snarks"])["tasks"]
    assert list(tasks["gsm8k_cot_gear"].eval_docs) == _json_lines(data_dir / "gsm8k" / "test.jsonl")
    assert list(tasks["aqua_cot_gear"].eval_docs) == _json_lines(data_dir / "aqua" / "test.json")
    snarks = [{**example, "subtask": "snarks"} for example in _bbh_examples(data_dir, "snarks")]
    assert list(tasks["bbh_cot_gear_snarks"].eval_docs) == snarks


@pytest.mark.parametrize("named_by", ["task argument", "environment variable"])
def test_hub_is_read_when_named(monkeypatch, tmp_path, named_by):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{"input": "Q", "target": "A"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    if named_by == "task argument":  # wins over a folder named by the environment
        monkeypatch.setenv("GEAR_DATA_DIR", str(tmp_path))
        choice = {"gear_data_dir": "hub"}
    else:
        monkeypatch.setenv("GEAR_DATA_DIR", "hub")
        choice = {}
    gear_cot.load_gsm8k(**choice)
    gear_cot.load_aqua(**choice)
    gear_cot.load_bbh("snarks", **choice)
    assert calls == [
        (("openai/gsm8k", "main"), {"split": "test"}),
        (("deepmind/aqua_rat", "raw"), {"split": "test"}),
        (("SaylorTwift/bbh", "snarks"), {"split": "test"}),
    ]


def test_environment_variable_names_the_data_folder(offline_data):
    assert len(gear_cot.load_bbh("snarks")["test"]) == 178


def test_task_argument_wins_over_environment_variable(offline_data, monkeypatch, tmp_path):
    monkeypatch.setenv("GEAR_DATA_DIR", str(tmp_path))
    manager = TaskManager(
        include_path=str(TASKS),
        include_defaults=False,
        metadata={"gear_data_dir": str(offline_data)},  # what --metadata passes
    )
    loaded = manager.load(["bbh_cot_gear_snarks"])
    assert len(loaded["tasks"]["bbh_cot_gear_snarks"].eval_docs) == 178


def test_named_data_folder_without_the_file_is_a_clear_error(offline_data, monkeypatch, tmp_path):
    monkeypatch.setenv("GEAR_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"GEAR_DATA_DIR.*gsm8k/test\.jsonl"):
        gear_cot.load_gsm8k()
    missing_bbh = r"task argument gear_data_dir.*bbh/tasks/snarks\.json"
    with pytest.raises(FileNotFoundError, match=missing_bbh):
        gear_cot.load_bbh("snarks", gear_data_dir=str(tmp_path))


class SameAnswer(LM):
    """Generates the same text for every request: right for some docs, wrong for others."""

    def generate_until(self, requests, disable_tqdm=False):
        return ["So the answer is (A) 18."] * len(requests)

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_scores_through_lm_eval(paper_tasks):
    manager, _ = paper_tasks
    # evaluate(), not simple_evaluate(): the same scoring, without the seconds that
    # simple_evaluate spends seeding torch and probing the environment and tokenizer
    results = evaluate(SameAnswer(), manager.load(["gear_paper"]), limit=1, bootstrap_iters=0)
    scores = {name: r.get("exact_match,none") for name, r in results["results"].items()}
    assert scores["gsm8k_cot_gear"] == 1.0  # Janet makes $18 a day
    assert scores["aqua_cot_gear"] == 1.0  # the first test question's answer is A
    bbh = [scores[f"bbh_cot_gear_{s}"] for s in BBH_SUBTASKS]
    assert 0 < sum(bbh) < 27
    assert scores["bbh_cot_gear"] == pytest.approx(sum(bbh) / 27)
