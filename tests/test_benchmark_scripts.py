"""CPU benchmark scripts run end to end in their smoke mode (tiny sizes), so a broken script
fails here rather than when its figures are wanted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_decode_step_smoke():
    run = subprocess.run([sys.executable, "-m", "benchmarks.decode_step", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and all(len(r.split("|")) == 7 for r in rows), run.stdout


def test_long_context_smoke():
    """Prompt compression against prefill, then a decode step on each path: a row a length in
    each table, the store smaller than the exact K/V, the packed torch path's working copy no
    larger than the rebuilt path's, every peak measured."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [[float(c) for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith(("| 100 ", "| 300 "))]
    compression, steps = rows[:2], rows[2:]
    assert [r[0] for r in compression] == [r[0] for r in steps] == [100, 300]
    assert all(r[1] > 0 and r[2] > 0 and 0 < r[5] < r[4] and r[6] >= 0 for r in compression), compression
    assert all(min(r[2:5]) > 0 and 0 < r[6] <= r[5] and min(r[7:]) >= 0 for r in steps), steps


def test_frontier_smoke(tmp_path):
    """The frontier sweep on SmolLM2 (two configs, two peers, one short prompt): every row
    measured, the picks written as options that GearConfig.from_options builds."""
    from gear_kernels import GearConfig

    picks = tmp_path / "frontier.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--smoke", "--json", str(picks),
                          "--needle-check", "2", "--length", "1024"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = json.loads(picks.read_text())
    assert [b["budget_bits"] for b in written["budgets"]] == [2.5, 3.0, 3.5, 4.5]
    rows = written["rows"]
    assert len(rows) == 4 and all(r["kl"] > 0 and 0 <= r["top1"] <= 1 and r["stored_bits"] > 2 for r in rows.values())
    # --needle-check: every pick, best peer and best plain kivi config carries the share of the
    # exact model's needles it keeps, as measured (once a config) in `needle_check`
    check = written["needle_check"]
    assert (check["task"], check["length"], check["documents"]) == ("niah_single_1", 1024, 2)
    for budget in written["budgets"]:
        if "options" in budget:
            assert budget["stored_bits"] <= budget["budget_bits"] + 0.05
            GearConfig.from_options(budget["options"])
            assert budget["needles_kept"] == check["kept"][" ".join(f"{k}={v}" for k, v in budget["options"].items())]
        for other in (budget.get("best_peer"), budget.get("best_plain_kivi")):
            if other is not None:
                assert other["needles_kept"] == check["kept"][other["name"]]
    assert all(0 <= kept <= 1 for kept in check["kept"].values())
    # --recheck: the same picks measured again on a question of another task, beside the peers,
    # and a config named with --configs after them
    again = tmp_path / "recheck.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--smoke", "--task", "bbh:date_understanding",
                          "--first", "3", "--recheck", str(picks), "--json", str(again),
                          "--configs", '[{"method": "kivi", "key_bits": 2, "value_bits": 3}]'],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rechecked = json.loads(again.read_text())
    assert rechecked["task"] == "bbh:date_understanding" and rechecked["questions"] == [3, 4]
    for before, now in zip(written["budgets"], rechecked["budgets"]):
        assert now.get("options") == before.get("options")
        assert ("best_peer" in now) == ("best_peer" in before)
    named = "method=kivi key_bits=2 value_bits=3"
    assert set(rechecked["rows"]) - {named} <= set(rows) and rechecked["rows"][named]["kl"] > 0
    assert rechecked["rows"] != rows  # other prompts, other figures


def test_needle_picks_take_the_lowest_kl_config_that_keeps_every_needle():
    """--needle-check's rule on made-up rows: per budget, configs are tried in order of KL until
    one keeps every needle (none measured beyond it); where none does, the one keeping the most;
    peers and configs over the budget are never picks."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.frontier import needle_picks

    def row(kl, bits, peer=None):
        return {"options": None if peer else {"method": "kivi"}, "peer": peer, "kl": kl, "stored_bits_max": bits}

    rows = {"a": row(0.1, 2.4), "b": row(0.2, 2.4), "c": row(0.3, 2.45), "d": row(0.05, 3.0),
            "e": row(0.01, 3.4), "peer": row(0.001, 2.0, peer="turboquant-2")}
    shares = {"a": 0.5, "b": 1.0, "c": 1.0, "d": 1.0, "e": 0.75}
    asked = []

    def kept(name):
        asked.append(name)
        return shares[name]

    assert needle_picks(rows, kept, budgets=(2.5, 3.0)) == {2.5: "b", 3.0: "d"}
    assert asked == ["a", "b", "d"]  # c is never measured: b, before it, keeps every needle
    shares |= {"b": 0.5, "c": 0.75, "d": 0.25}
    assert needle_picks(rows, shares.get, budgets=(2.5, 2.0)) == {2.5: "c"}  # the most kept; nothing fits 2.0
    shares["a"] = 0.75
    assert needle_picks(rows, shares.get, budgets=(2.5,)) == {2.5: "a"}  # a tie in needles: the lower KL


def test_frontier_refuses_configs_that_are_not_options():
    """--configs is checked before the model loads: a clear line, the option named."""
    for configs, said in (('{"method": "kivi"}', "list of option dicts"), ('[{"method": "kivi", "bits": 9}]', "bits")):
        run = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--configs", configs], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "--configs" in run.stderr and said in run.stderr, run.stderr[-2000:]


def test_turboquant_at_one_seed_is_the_peers():
    """The project's turboquant and fused-turboquant's, given the same rotation seed, are as
    faithful as each other (within 10% KL) on a frontier prompt: a gap between the frontier's two
    rows is the rotation drawn, not the quantizer."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.turboquant_seeds", "--bits", "3", "--seeds", "0",
                          "--peer-seeds", "0", "--questions", "1", "--tokens", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    kl = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in run.stdout.splitlines()
          if line.startswith(("| project", "| fused-turboquant"))}
    assert set(kl) == {"project", "fused-turboquant"} and kl["project"] > 0
    assert abs(kl["project"] / kl["fused-turboquant"] - 1) < 0.1, kl


@pytest.mark.parametrize("entry", ["turboquant-2", "quanto-2", {"method": "gear", "bits": 2}])
def test_frontier_feeds_each_cache_as_generation_does(monkeypatch, entry):
    """The frontier forces every cache in pieces that end on its flushes: the same logits, to
    float rounding, as feeding the continuation one token at a time (a tiny random Llama)."""
    from lm_eval_gear.compat import cache_kwarg
    from tiny_models import tiny_model

    sys.path.insert(0, str(ROOT))
    import benchmarks.frontier as frontier

    monkeypatch.setattr(frontier, "BUFFER", 8)
    model, _ = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids, continuation = torch.randint(1, 100, (1, 32), generator=g), torch.randint(1, 100, (1, 21), generator=g)
    kv, first = frontier.prefill(model, ids)
    pieces, bits = frontier.forced(model, entry, kv, first, continuation)
    cache = frontier.make_cache(entry, model)
    for i, (keys, values) in enumerate(kv):
        cache.update(keys, values, i)
    steps = [first] + [model(continuation[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits[0]
                       for t in range(continuation.shape[1] - 1)]
    torch.testing.assert_close(pieces, torch.cat(steps).float(), atol=1e-4, rtol=1e-4)
    assert 2 < bits < 16  # stored bits of the compressed part (head_dim 16 makes the overheads large)


@pytest.mark.parametrize("entry", ["exact", {"method": "kivi", "bits": 2}])
def test_frontier_answers_greedily_as_generate_does(entry):
    """--task niah: a cache's greedy answer from the exact prompt keys and values is generate()'s
    with that cache after the prompt (a tiny random Llama); needles are matched as RULER does."""
    from transformers import DynamicCache

    from lm_eval_gear.compat import cache_kwarg
    from tiny_models import tiny_model

    sys.path.insert(0, str(ROOT))
    import benchmarks.frontier as frontier

    model, _ = tiny_model("llama")
    ids = torch.randint(1, 100, (1, 40), generator=torch.Generator().manual_seed(2))
    kv, first = frontier.prefill(model, ids)
    answer = frontier.generated(model, entry, kv, first, 12)
    cache = DynamicCache(config=model.config) if entry == "exact" else frontier.make_cache(entry, model)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, **{cache_kwarg(model): cache})[0, ids.shape[1]:]
    assert torch.equal(answer, want)
    assert frontier.needles_found("The numbers are 7150342 and 12.", ["7150342", "999"]) == 0.5


def test_batch_invariance_smoke():
    """benchmarks.batch_invariance on SmolLM2 at tiny sizes: one row per run, texts compared."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.batch_invariance", "--questions", "2", "--batch-size", "2",
                          "--tokens", "3", "--configs", "kivi-2-g8b4"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[1].strip() for r in rows] == [
        "hf (exact cache, batched)", "kivi-2-g8b4, each prompt alone (gear-hf)", "kivi-2-g8b4, batched"]
    assert rows[1][2].strip() == "2/2", run.stdout  # alone: the same at every batch size, by construction
