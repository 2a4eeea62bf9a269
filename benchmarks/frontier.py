"""The fidelity frontier: for a memory budget, the most faithful cache config, beside the peers.

    python -m benchmarks.frontier --questions 8 --tokens 64 --needle-check 16 --plot benchmarks/frontier.png
    python -m benchmarks.frontier --pretrained PATH_OR_HUB_ID   # the same sweep on your model
    python -m benchmarks.frontier --recheck benchmarks/frontier.json --first 8   # the picks, other prompts
    python -m benchmarks.frontier --smoke                       # a few configs, seconds
    python -m benchmarks.frontier --task niah --recheck benchmarks/frontier.json --questions 4   # at 4k, needles
    python -m benchmarks.frontier --task niah --configs '[{"method": "kivi", "key_bits": 2, "value_bits": 3}]'

Every config runs in one process on the same prompts (by default GSM8K test questions behind
the paper's 8-shot prompt; --task aqua or bbh:<subtask> for the others; --task niah for RULER's
niah_single_1 documents at --length tokens, built by lm-eval's own code, where each cache, the
exact one too, also answers greedily and is scored by the needles its answer holds): the exact model
prefills each prompt once and greedily generates `--tokens` tokens; each cache then gets the
same exact prompt keys and values (compressing them as after a prefill) and is teacher-forced
along that continuation in pieces that end where its buffer flushes (lm_eval_gear.forcing:
every cache here, the peers' residual windows included, flushes every BUFFER tokens after the
prompt, so each token sees what it would see in generation).
Figures, averaged over the prompts:

- KL: mean KL(exact || cache) per forced token, nats; top-1: next-token agreement;
- stored bits: 8 * bytes stored for the compressed part / its K and V elements, measured from
  the stored tensors (the exact buffer, the same for every cache, is left out); a config fits
  a budget when it stores no more than the budget + SLACK on every prompt (a pick: with
  RESERVE of it to spare).

The grid sweeps the project's codecs over bits, groups, ranks, outlier ratios, rotation and
sinks, and its quantizers (uniform kivi codes, and turboquant's codebook alone and under GEAR's
corrections); the peers are TurboQuant (fused-turboquant's TurboQuantMSE, CPU path, given GEAR's
streaming buffer; see benchmarks/turboquant_cache.py) and transformers' QuantizedCache with
quanto and HQQ. For each budget, the pick is the project config with the lowest KL among those
that fit it; with `--needle-check N`, among those that also keep every needle the exact model
finds in RULER's niah_single_1 documents 1-N at --length tokens (answering greedily; configs are
tried in order of KL, and where none keeps them all, the one that keeps the most is the pick),
so that a pick faithful on CoT prompts does not lose what a long context holds. It is written,
with the best peer under the same budget, to `--json` (benchmarks/frontier.json), whose
`options` build the config with GearConfig.from_options.
`--recheck benchmarks/frontier.json --first 8` measures those picks again on other prompts,
beside the peers and the best plain KIVI configs, and tables them the same way; `--configs`
measures the configs it lists (after the picks, with --recheck) beside the peers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

from gear_kernels import GearConfig
from lm_eval_gear import GearCache
from lm_eval_gear.cache import model_head_dim
from lm_eval_gear.calibration import compressed_bits, forced_logits, prefill
from lm_eval_gear.compat import cache_kwarg
from lm_eval_gear.fidelity import agreement, exact_run
from lm_eval_gear.smollm2 import smollm2_tokenizer_dir
from lm_eval_gear.tasks import gear_cot
from benchmarks.fidelity import stored_bytes
from benchmarks.smollm2 import DEFAULT_DATA_DIR, load_smollm2
from benchmarks.turboquant_cache import compressed_bits as turboquant_bits
from benchmarks.turboquant_cache import turboquant_cache

BUDGETS = (2.5, 3.0, 3.5, 4.5)
SLACK = 0.05  # bits a config may store beyond a budget and still fit it (partial groups, index widths)
# Of that slack, what a pick keeps in reserve on the prompts it is chosen on: on shorter prompts
# a sink or a partial quantization group costs more bits per element.
RESERVE = 0.03
BUFFER = 64  # every cache's exact window (GEAR's buffer, the peers' residual length)
NEEDLE_TOKENS = 24  # tokens of a greedy answer searched for the needles (--task niah)


def _product(**axes) -> list[dict]:
    """Every combination of the axes' values, as option dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def project_grid() -> list[dict]:
    """The project's configs, as the options a user passes (--model_args); defaults left out.
    Only the prompt is compressed along 64 forced tokens (the continuation stays in the buffer),
    so chunk ranks are set to the prompt's and not swept."""
    rotations = ("none", "hadamard")
    grid = _product(method=["kivi"], bits=[2, 3, 4], group_size=[32, 64, 128], rotation=rotations)
    grid += _product(method=["kivi"], key_bits=[2, 3, 4], value_bits=[2, 3, 4], group_size=[64, 128],
                     rotation=rotations)
    grid = [g for g in grid if g.get("key_bits") != g.get("value_bits") or "bits" in g]  # equal splits: `bits` above
    grid += _product(method=["gear-l"], bits=[2, 3], rank_prompt=[1, 4], lowrank_dtype=["int8"],
                     group_size=[64, 128], rotation=rotations)
    grid += _product(method=["gear"], bits=[2, 3], outlier_ratio=[0.005, 0.01], rank_prompt=[0, 2],
                     lowrank_dtype=["int8"], outlier_dtype=["fp16"], group_size=[128], rotation=rotations)
    # corrections on key-heavy splits, where the codes alone do best
    grid += _product(method=["gear-l"], key_bits=[3, 4], value_bits=[2], rank_prompt=[1], lowrank_dtype=["int8"],
                     group_size=[64, 128], rotation=["hadamard"])
    grid += _product(method=["gear"], key_bits=[3], value_bits=[2], outlier_ratio=[0.005], rank_prompt=[0, 1],
                     lowrank_dtype=["int8"], outlier_dtype=["fp16"], group_size=[128], rotation=["hadamard"])
    grid += [{"method": "gear", "bits": b} for b in (2, 4)]  # the paper's defaults
    # the first tokens kept exact (attention sinks), on the best codes-only configs and corrections:
    # one sink (the first token draws most of the attention; 4 buy little more for 4x the bits),
    # and group 80, where a sink's bits fit beside the codes of budgets that group 64 alone fills
    grid += _product(method=["kivi"], bits=[2, 3, 4], group_size=[64, 80, 128], rotation=["hadamard"], sink_tokens=[1])
    grid += _product(method=["kivi"], key_bits=[3, 4], value_bits=[2], group_size=[64, 80, 128], rotation=["hadamard"],
                     sink_tokens=[1])
    grid += _product(method=["kivi"], bits=[2, 4], group_size=[64], rotation=["hadamard"], sink_tokens=[4])
    grid += _product(method=["gear-l"], key_bits=[3], value_bits=[2], rank_prompt=[1], lowrank_dtype=["int8"],
                     group_size=[80, 128], rotation=["hadamard"], sink_tokens=[1])
    grid += _product(method=["gear"], bits=[2], outlier_ratio=[0.005], rank_prompt=[0, 1], lowrank_dtype=["int8"],
                     outlier_dtype=["fp16"], group_size=[128], rotation=["none", "hadamard"], sink_tokens=[1])
    # the TurboQuant quantizer (a codebook for rotated coordinates, one norm a vector; rotated by
    # default), alone as the peer's twin, unrotated, key-heavy, with a sink, and under GEAR's corrections
    grid += _product(method=["kivi"], backbone=["turboquant"], bits=[2, 3, 4], rotation=rotations)
    grid += _product(method=["kivi"], backbone=["turboquant"], key_bits=[3, 4], value_bits=[2])
    grid += _product(method=["kivi"], backbone=["turboquant"], bits=[2, 3], sink_tokens=[1])
    grid += _product(method=["gear-l"], backbone=["turboquant"], bits=[2, 3], rank_prompt=[1], lowrank_dtype=["int8"])
    grid += _product(method=["gear"], backbone=["turboquant"], bits=[2, 3], outlier_ratio=[0.005], rank_prompt=[0, 1],
                     lowrank_dtype=["int8"], outlier_dtype=["fp16"])
    grid += _product(method=["gear"], backbone=["turboquant"], bits=[2], outlier_ratio=[0.005], rank_prompt=[1],
                     lowrank_dtype=["int8"], outlier_dtype=["fp16"], sink_tokens=[1])
    for g in grid:
        if "rank_prompt" in g:
            g["rank_chunk"] = g["rank_prompt"]
    return grid


PEERS = {f"turboquant-{b}": ("turboquant", b) for b in (2, 3, 4)}
PEERS |= {f"{backend}-{b}": (backend, b) for backend in ("quanto", "hqq") for b in (2, 4)}
SMOKE_GRID = [{"method": "kivi", "bits": 2}, {"method": "gear", "bits": 2, "outlier_ratio": 0.01, "rank_prompt": 1}]
SMOKE_PEERS = ("turboquant-2", "quanto-2")


def label(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


# ------------------------------------------------------------------ caches


def make_cache(entry, model):
    """A fresh cache for a grid entry (options dict) or a peer name."""
    if isinstance(entry, dict):
        return GearCache(GearConfig.from_options({**entry, "buffer_size": BUFFER}), model.config)
    backend, bits = PEERS[entry]
    if backend == "turboquant":
        return turboquant_cache(model.config, bits, BUFFER)
    return QuantizedCache(backend=backend, config=model.config, nbits=bits, q_group_size=64, residual_length=BUFFER)


def bits_stored(cache, model) -> float:
    """Stored bits per element of the compressed part of a cache (its exact buffer left out)."""
    if isinstance(cache, GearCache):
        return compressed_bits(cache)
    if isinstance(cache, QuantizedCache):
        held = sum(stored_bytes(layer._quantized_keys) + stored_bytes(layer._quantized_values) for layer in cache.layers)
        cfg, layer = model.config, cache.layers[0]
        quantized = layer.cumulative_length - (layer.keys.shape[-2] if layer.keys.dim() == 4 else 0)
        elements = 2 * len(cache.layers) * cfg.num_key_value_heads * model_head_dim(cfg) * quantized
        return 8 * held / elements
    return turboquant_bits(cache)


def forced(model, entry, kv, first_logits: torch.Tensor, continuation: torch.Tensor, cache=None):
    """The cache's next-token logits (n, vocab) along continuation (1, n), from the exact prompt
    keys and values `kv`, and the cache's stored bits. cache: a fresh one to use instead of the
    entry's (benchmarks/turboquant_seeds.py gives the peer other seeds)."""
    if cache is None:
        cache = DynamicCache(config=model.config) if entry == "exact" else make_cache(entry, model)
    logits = forced_logits(model, cache, kv, first_logits, continuation, BUFFER)
    return logits, None if entry == "exact" else bits_stored(cache, model)


@torch.no_grad()
def generated(model, entry, kv, first_logits: torch.Tensor, tokens: int) -> torch.Tensor:
    """The cache's greedy continuation (tokens,) from the exact prompt keys and values `kv`."""
    cache = DynamicCache(config=model.config) if entry == "exact" else make_cache(entry, model)
    for i, (keys, values) in enumerate(kv):
        cache.update(keys, values, i)
    out = [first_logits.argmax(-1)]  # (1,)
    for _ in range(tokens - 1):
        out.append(model(out[-1][:, None], use_cache=True, **{cache_kwarg(model): cache}).logits[:, -1].argmax(-1))
    return torch.cat(out)


def found_needles(text: str, needles: list[str]) -> set[str]:
    """The needles an answer holds, matched as RULER's string_match_all matches them."""
    return {n for n in needles if n.lower() in text.lower()}


def needles_found(text: str, needles: list[str]) -> float:
    """RULER's string_match_all on one answer: the share of the needles the text holds."""
    return len(found_needles(text, needles)) / len(needles)


def niah_prompts(tokenizer_dir: str, length: int, first: int, count: int) -> list[tuple[str, list[str]]]:
    """RULER's niah_single_1 documents [first, first + count) at `length` tokens, built as
    lm-eval builds them (locally, with the model's tokenizer): (prompt, needles), the prompt
    being the document's input and its answer prefix. RULER draws its needles from Python's
    `random`, which lm_eval seeds with its --seed (0 by default): seeded alike, these are the
    documents of `lm_eval --tasks niah_single_1`."""
    from lm_eval.tasks.ruler.niah_utils import niah_single_1

    random.seed(0)
    docs = niah_single_1(max_seq_lengths=[length], tokenizer=tokenizer_dir)["test"]
    return [(f"{docs[i]['input']} {docs[i]['gen_prefix']}", list(docs[i]["outputs"])) for i in range(first, first + count)]


def task_prompts(task: str, data_dir: Path, first: int, count: int) -> list[str]:
    """The paper's CoT prompts (as the shipped tasks build them) of questions [first, first + count)
    of task gsm8k (8-shot), aqua (8-shot) or bbh:<subtask> (3-shot)."""
    if task.startswith("bbh:"):
        docs, prompt = gear_cot.load_bbh(task[4:], gear_data_dir=str(data_dir))["test"], gear_cot.bbh_prompt
    elif task in ("gsm8k", "aqua"):
        load, prompt = getattr(gear_cot, f"load_{task}"), getattr(gear_cot, f"{task}_prompt")
        docs = load(gear_data_dir=str(data_dir))["test"]
    else:
        raise SystemExit(f"--task {task!r}: use gsm8k, aqua, bbh:<subtask> (e.g. bbh:boolean_expressions) or niah")
    if first + count > len(docs):
        raise SystemExit(f"--task {task} has {len(docs)} questions; --first {first} --questions {count} asks beyond them")
    return [prompt(docs[i]) for i in range(first, first + count)]


def sweep(model, tokenizer, prompts: list[str], entries, tokens: int,
          needles: list[list[str]] | None = None, answer_tokens: int = NEEDLE_TOKENS) -> dict[str, dict]:
    """label -> {options or peer, kl, top1, stored_bits, stored_bits_max}, averaged over the
    prompts; with each prompt's needles, also `needles`: the share its greedy answer of
    answer_tokens tokens holds (RULER's string match), "exact" among the rows."""
    per = {(label(e) if isinstance(e, dict) else e): [] for e in entries}
    if needles is not None:
        per["exact"] = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        continuation, _ = exact_run(model, ids, tokens)
        kv, first = prefill(model, ids)
        exact, _ = forced(model, "exact", kv, first, continuation)
        for entry, name in zip(entries, per):
            logits, bits = forced(model, entry, kv, first, continuation)
            per[name].append({**agreement(exact, logits), "stored_bits": bits})
        if needles is not None:
            per["exact"].append({"kl": 0.0, "top1": 1.0, "stored_bits": 8 * model.dtype.itemsize})
            for entry, name in zip([*entries, "exact"], per):
                answer = tokenizer.decode(generated(model, entry, kv, first, answer_tokens))
                per[name][-1]["needles"] = needles_found(answer, needles[i])
        print(f"prompt {i + 1}/{len(prompts)} ({ids.shape[1]} tokens) done", flush=True)
    entries = [*entries, "exact"] if needles is not None else entries
    rows = {}
    for entry, (name, runs) in zip(entries, per.items()):
        means = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        own, peer = (entry, None) if isinstance(entry, dict) else (None, None if entry == "exact" else entry)
        rows[name] = {"options": own, "peer": peer}  # the exact row: neither, so never a pick
        rows[name] |= means | {"stored_bits_max": max(r["stored_bits"] for r in runs)}
    return rows


class NeedleCheck:
    """--needle-check: whether a cache keeps the needles of a long context. RULER's niah_single_1
    documents [0, count) at `length` tokens, each prefilled once by the exact model (their keys
    and values held for every cache: about 0.2 GB a 4k document on SmolLM2); `kept(name, entry)`
    is the share of the needles the exact model's greedy answers hold that the entry's answers
    hold too (1.0: every one), measured once a name and kept in `measured`."""

    def __init__(self, model, tokenizer, tokenizer_dir: str, length: int, count: int):
        self.model, self.tokenizer = model, tokenizer
        self.docs = []
        for prompt, needles in niah_prompts(tokenizer_dir, length, 0, count):
            kv, first = prefill(model, tokenizer(prompt, return_tensors="pt").input_ids)
            self.docs.append((kv, first, needles))
        self.exact = self._found("exact")
        if not any(self.exact):
            raise SystemExit(f"--needle-check: the exact model finds no needle in the {count} documents at {length} "
                             "tokens, so no cache can be told apart by them; give more documents or a shorter --length")
        self.measured: dict[str, float] = {}

    def _found(self, entry) -> list[set[str]]:
        return [found_needles(self.tokenizer.decode(generated(self.model, entry, kv, first, NEEDLE_TOKENS)), needles)
                for kv, first, needles in self.docs]

    def kept(self, name: str, entry) -> float:
        if name not in self.measured:
            found = self._found(entry)
            self.measured[name] = sum(len(f & e) for f, e in zip(found, self.exact)) / sum(map(len, self.exact))
            print(f"needle check: {name} keeps {self.measured[name]:.2f} of the exact model's needles", flush=True)
        return self.measured[name]


# ------------------------------------------------------------------ picks and output


def _ours_fitting(rows: dict[str, dict], budget: float) -> list[str]:
    """The project configs a pick for the budget may be: storing at most it + SLACK - RESERVE on every prompt."""
    return [n for n, r in rows.items() if r["options"] is not None and r["stored_bits_max"] <= budget + SLACK - RESERVE]


def needle_picks(rows: dict[str, dict], kept, budgets=BUDGETS) -> dict[float, str]:
    """Per budget: of the project configs that fit it, the lowest-KL one that keeps every needle
    (kept(name) == 1.0, measured lazily, in order of KL), or, where none does, the one that keeps
    the most (the lowest KL among those)."""
    chosen = {}
    for budget in budgets:
        fitting = sorted(_ours_fitting(rows, budget), key=lambda n: rows[n]["kl"])
        chosen_here = next((n for n in fitting if kept(n) == 1.0), None)
        if chosen_here is None and fitting:
            chosen_here = max(fitting, key=lambda n: (kept(n), -rows[n]["kl"]))
        if chosen_here is not None:
            chosen[budget] = chosen_here
    return chosen


def picks(rows: dict[str, dict], budgets=BUDGETS, chosen: dict[float, str] | None = None, kept=None) -> list[dict]:
    """Per budget: the project's lowest-KL config storing no more than it + SLACK - RESERVE on
    every prompt, or the one `chosen` names for it (needle_picks, a recheck), and the best peer
    (TurboQuant, quanto, HQQ) and the best plain KIVI config (no rotation, one bit width) storing
    no more than the budget + SLACK; with `kept` (NeedleCheck), each one's share of the needles kept."""
    def best(names):
        return min(names, key=lambda n: rows[n]["kl"], default=None)

    def figures(name, keys):
        return {k: rows[name][k] for k in keys if k in rows[name]} | ({} if kept is None else {"needles_kept": kept(name)})

    out = []
    for budget in budgets:
        fits = [n for n, r in rows.items() if r["stored_bits_max"] <= budget + SLACK]
        ours = best(_ours_fitting(rows, budget)) if chosen is None else chosen.get(budget)
        peer = best([n for n in fits if rows[n]["peer"] is not None])
        kivi = best([n for n in fits if _plain_kivi(rows[n]["options"])])
        entry = {"budget_bits": budget}
        if ours is not None:
            entry |= figures(ours, ("options", "stored_bits", "stored_bits_max", "kl", "top1", "needles"))
        for key, name in (("best_peer", peer), ("best_plain_kivi", kivi)):
            if name is not None:
                entry[key] = figures(name, ("stored_bits", "kl", "needles")) | {"name": name}
        out.append(entry)
    return out


def rechecked(frontier: dict) -> tuple[list[dict], dict[float, str]]:
    """A frontier JSON -> (its picks' and best plain KIVI configs' options, budget -> pick label)."""
    grid, chosen = [], {}
    for budget in frontier["budgets"]:
        if "options" not in budget:
            continue
        chosen[budget["budget_bits"]] = label(budget["options"])
        kivi = budget.get("best_plain_kivi")
        for options in (budget["options"], None if kivi is None else frontier["rows"][kivi["name"]]["options"]):
            if options is not None and options not in grid:
                grid.append(options)
    return grid, chosen


def _plain_kivi(options: dict | None) -> bool:
    """KIVI as its paper has it: kivi's uniform codes alone, one bit width, no rotation, no sinks."""
    if options is None:
        return False
    codec = GearConfig.from_options(options).codec
    return options["method"] == "kivi" and codec.backbone == "kivi" and codec.key_bits == codec.value_bits \
        and codec.rotation == "none" and codec.sink_tokens == 0


def table(rows: dict[str, dict]) -> str:
    needles = all("needles" in r for r in rows.values())
    lines = ["| config | stored bits | most on a prompt | KL (nats) | top-1 |" + (" needles found |" if needles else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if needles else "")]
    for name, r in sorted(rows.items(), key=lambda item: item[1]["stored_bits"]):
        lines.append(f"| {name} | {r['stored_bits']:.2f} | {r['stored_bits_max']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} |"
                     + (f" {r['needles']:.2f} |" if needles else ""))
    return "\n".join(lines)


def picks_table(chosen: list[dict]) -> str:
    """The picks beside the best peer and plain KIVI config; with needles (--task niah: the share
    found; --needle-check: the share of the exact model's kept), each one's after its KL."""
    share = next((k for k in ("needles", "needles_kept") if any(k in p for p in chosen)), None)
    needles = share is not None
    found = lambda r: f", {r[share]:.2f}" if needles else ""  # noqa: E731
    lines = [f"| budget | pick | stored bits (most on a prompt) | KL{', needles' if needles else ''} "
             f"| best peer (KL{', needles' if needles else ''}) | pick / peer "
             f"| best plain kivi (KL{', needles' if needles else ''}) | pick / kivi |", "|---:|---|---:|---:|---|---:|---|---:|"]
    for p in chosen:
        if "options" not in p:
            lines.append(f"| {p['budget_bits']} | nothing fits | | | | | | |")
            continue
        cells = []
        for key in ("best_peer", "best_plain_kivi"):
            other = p.get(key)
            cells += ["-", "-"] if other is None else [f"{other['name']} ({other['kl']:.4f}{found(other)})",
                                                       f"{p['kl'] / other['kl']:.2f}"]
        lines.append(f"| {p['budget_bits']} | {label(p['options'])} | {p['stored_bits']:.2f} ({p['stored_bits_max']:.2f}) "
                     f"| {p['kl']:.4f}{found(p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], chosen: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = {"kivi": "tab:blue", "gear-l": "tab:orange", "gear": "tab:red"}
    for name, r in rows.items():
        if r["options"] is None and r["peer"] is None:  # the exact run (--task niah), KL 0
            continue
        if r["peer"] is not None:
            ax.scatter(r["stored_bits"], r["kl"], marker="s", color="black")
            ax.annotate(name, (r["stored_bits"], r["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        else:
            ax.scatter(r["stored_bits"], r["kl"], s=14, color=families[r["options"]["method"]], alpha=0.7)
    for budget in BUDGETS:
        ax.axvline(budget, color="gray", linestyle=":", linewidth=0.8)
    for p in chosen:
        if "options" in p:
            ax.scatter(p["stored_bits"], p["kl"], s=80, facecolors="none", edgecolors="green")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in families.items()]
    handles += [plt.Line2D([], [], marker="s", linestyle="", color="black", label="peers"),
                plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="green", label="picks")]
    ax.legend(handles=handles, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per K/V element (compressed part, measured)")
    ax.set_ylabel("teacher-forced KL(exact || cache), nats")
    ax.set_title("KL against stored bits (lower left is better); dotted: the budgets")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_model(pretrained: str | None):
    if pretrained is None:
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(pretrained)


def option_dicts(text: str) -> list[dict]:
    """--configs: a JSON list of option dicts, each one GearConfig.from_options builds."""
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise argparse.ArgumentTypeError('a JSON list of option dicts, e.g. \'[{"method": "kivi", "bits": 3}]\'')
    for options in configs:
        try:
            GearConfig.from_options(options)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"{options}: {error}") from None
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="a model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder laid out like ../shared/data")
    parser.add_argument("--task", default="gsm8k", help="gsm8k, aqua or bbh:<subtask> (the paper's CoT prompts), or "
                        "niah (RULER's niah_single_1 at --length tokens: needles found too)")
    parser.add_argument("--length", type=int, default=4096, help="RULER's max_seq_length, with --task niah "
                        "or --needle-check")
    parser.add_argument("--needle-check", type=int, default=0, metavar="N", help="choose each budget's pick among the "
                        "configs that keep every needle the exact model finds in RULER's niah_single_1 documents 1-N")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--first", type=int, default=0, help="skip this many questions")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--plot", type=Path, help="write the KL-against-bits plot (PNG) here")
    parser.add_argument("--json", type=Path, help="where the picks go (default benchmarks/frontier.json; none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="two configs and two peers, on one short run")
    parser.add_argument("--recheck", type=Path, help="re-measure the picks of this frontier JSON (and its best plain "
                        "KIVI configs, beside every peer) on the prompts given, e.g. --first 8")
    parser.add_argument("--configs", type=option_dicts, default=[], help="a JSON list of option dicts (--model_args "
                        "as a dict) to measure beside the peers instead of the grid (with --recheck: after the picks)")
    args = parser.parse_args()
    if args.smoke:
        args.questions, args.tokens = 1, 8
    if args.needle_check < 0:
        parser.error(f"--needle-check {args.needle_check}: give a number of documents, e.g. --needle-check 16")
    model, tokenizer = load_model(args.pretrained)
    # RULER builds its documents with the model's tokenizer, named by folder (the embedded one saved once)
    ruler = args.task == "niah" or args.needle_check
    tokenizer_dir = args.pretrained or (str(smollm2_tokenizer_dir()) if ruler else None)
    needles = None
    if args.task == "niah":
        docs = niah_prompts(tokenizer_dir, args.length, args.first, args.questions)
        prompts, needles = [p for p, _ in docs], [n for _, n in docs]
    else:
        prompts = task_prompts(args.task, args.data, args.first, args.questions)
    grid, peers = (SMOKE_GRID, SMOKE_PEERS) if args.smoke else (project_grid(), PEERS)
    earlier = None
    if args.recheck is not None:
        grid, earlier = rechecked(json.loads(args.recheck.read_text()))
    if args.configs:
        grid = grid if args.recheck is not None else []
        grid += [c for c in args.configs if c not in grid]
    entries = grid + list(peers)
    began = time.perf_counter()
    rows = sweep(model, tokenizer, prompts, entries, args.tokens, needles)
    check, kept = None, None
    if args.needle_check:
        check = NeedleCheck(model, tokenizer, tokenizer_dir, args.length, args.needle_check)

        def kept(name):
            return check.kept(name, rows[name]["options"] or rows[name]["peer"])

        if earlier is None:
            earlier = needle_picks(rows, kept)
    chosen = picks(rows, chosen=earlier, kept=kept)
    name = args.pretrained or "SmolLM2-135M-Instruct (embedded)"
    what = f"RULER niah_single_1 at {args.length} tokens, documents" if needles else f"{args.task} questions"
    print(f"\n{name}, fp32, {what} {args.first + 1}-{args.first + len(prompts)}, "
          f"{args.tokens} forced tokens{f', {NEEDLE_TOKENS}-token greedy answers' if needles else ''}, buffer {BUFFER}, "
          f"torch {torch.__version__}, "
          f"{time.perf_counter() - began:.0f} s"
          + (f"; needles kept: niah_single_1 documents 1-{args.needle_check} at {args.length} tokens" if check else "")
          + "\n")
    print(table(rows) + "\n\n" + picks_table(chosen))
    if args.json is None and not args.smoke and args.recheck is None and not args.configs and args.task == "gsm8k":
        args.json = Path(__file__).with_name("frontier.json")
    if args.json is not None:
        written = {"model": name, "task": args.task, "questions": [args.first, args.first + len(prompts)],
                   "tokens": args.tokens, "budgets": chosen, "rows": rows}
        if check is not None:
            written["needle_check"] = {"task": "niah_single_1", "length": args.length, "documents": args.needle_check,
                                       "kept": check.measured}
        args.json.write_text(json.dumps(written, indent=1) + "\n")
    if args.plot:
        plot(rows, chosen, args.plot)


if __name__ == "__main__":
    main()
