"""Registration of the ``gear-hf`` model and the GEAR task folder with lm-eval.

lm-eval 0.4.13 has no plugin hook for models, and its registry imports the built-in models
(``lm_eval.models``) only while the registry is still empty: registering ``gear-hf`` too early
would leave the registry non-empty and hide ``hf`` and every other built-in model. So we
register *after* the built-ins:

* After ``pip install`` (regular or editable) the file ``lm_eval_gear_hook.pth`` in
  site-packages imports the tiny module ``_lm_eval_gear_hook`` at interpreter start-up. It only
  watches for ``lm_eval.api.registry``, ``lm_eval.tasks.manager``,
  ``lm_eval.config.evaluate_config`` and ``lm_eval.loggers.evaluation_tracker`` and calls
  :func:`on_import` once each is loaded. Unrelated processes pay for one small module.
* :func:`register_model` imports ``lm_eval.models`` first (lazy placeholders only, cheap), so the
  built-ins are in place, then adds ``gear-hf`` as a lazy placeholder: ``lm_eval_gear.model``
  (and torch/transformers with it) is imported only when ``--model gear-hf`` is asked for.
* :func:`patch_cli_config` checks ``gear-hf``'s ``--model_args`` right after lm-eval's CLI has
  parsed them, so a bad GEAR option stops the run at once with a one-line message, and tags a
  ``--use_cache`` path with the GEAR config (lm-eval keys cached responses by request alone).
  It also stops, before the model loads, an offline run of an lm-eval task whose hub dataset is
  not in the local cache, naming the shipped twin (``gsm8k_cot``: use ``gsm8k_cot_gear``), or of
  a RULER task that downloads its haystack, naming those that build theirs locally. On the
  embedded default model it names that model's tokenizer in the run's metadata, where RULER's
  tasks look for one.
* :func:`patch_results_naming` names the results folder of a run on the embedded default
  model after that model (lm-eval names it after ``pretrained``, else at random).
* :func:`patch_task_manager` makes every ``TaskManager`` with the default task folder also index
  the GEAR task folder (after lm-eval's own tasks, before any ``--include_path``), so
  ``lm_eval --tasks gsm8k_cot_gear`` works without flags.
* lm-eval releases that read the ``lm_eval.models`` entry-point group (see pyproject.toml) find
  ``gear-hf`` there as well; both routes register the same name only when it is still absent.

Without the .pth (e.g. running from a source tree that is not installed) call :func:`install`
before using lm-eval, or pass ``--include_path`` for the tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_NAME = "gear-hf"
MODEL_TARGET = "lm_eval_gear.model:GearHFLM"

_PATCH_MARK = "_lm_eval_gear_patched"

# lm-eval's own tasks that the shipped ones mirror (the same test set, few-shot chain of thought),
# by name prefix: theirs -> (ours, the hub dataset theirs reads). The rest of a name carries over
# (bbh_cot_fewshot_navigate -> bbh_cot_gear_navigate) where the shipped folder has that task.
HUB_TWINS = {"gsm8k_cot": ("gsm8k_cot_gear", "openai/gsm8k"), "bbh_cot_fewshot": ("bbh_cot_gear", "SaylorTwift/bbh")}


@dataclasses.dataclass(frozen=True)
class Download:
    """Something one of lm-eval's RULER tasks downloads to build its data."""

    what: str  # as the offline refusal names it
    cached: Callable[[], bool]  # whether this machine holds a copy (the task then runs offline)


def _nltk_has_punkt_tab() -> bool:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
    except (ImportError, LookupError):
        return False
    return True


ESSAYS_DATASET = "baber/paul_graham_essays"
ESSAYS = Download(f"Paul Graham's essays (hub dataset {ESSAYS_DATASET})", lambda: _in_datasets_cache(ESSAYS_DATASET))
PUNKT_TAB = Download("nltk's punkt_tab (which splits the essays into sentences)", _nltk_has_punkt_tab)
# lm-eval fetches these with requests at every run and keeps no copy
SQUAD = Download("SQuAD (fetched from the web at every run)", lambda: False)
HOTPOTQA = Download("HotpotQA (fetched from the web at every run)", lambda: False)

# lm-eval's RULER tasks (lm_eval/tasks/ruler) build their data at run time, sized with a tokenizer:
# task -> what it downloads for it. Those that download nothing build their haystacks locally
# (repeated sentences, generated needles, word lists, variable chains) and so run offline.
RULER_DOWNLOADS: dict[str, tuple[Download, ...]] = {
    "niah_single_1": (), "niah_multikey_2": (), "niah_multikey_3": (),
    "ruler_cwe": (), "ruler_fwe": (), "ruler_vt": (),
    **dict.fromkeys(
        ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"), (ESSAYS, PUNKT_TAB)
    ),
    "ruler_qa_squad": (SQUAD,), "ruler_qa_hotpot": (HOTPOTQA,),
}
# lm-eval's group and tag that hold every RULER task
RULER_GROUPS = ("ruler", "longcxt")


def tasks_dir() -> Path | None:
    """The folder of GEAR task YAMLs: packaged (``lm_eval_gear/tasks``) or the source tree's ``tasks/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "tasks"
    if packaged.is_dir():
        return packaged
    # editable install or plain source checkout: the repository's top-level tasks/
    source = here.parent / "tasks"
    if source.is_dir() and (here.parent / "pyproject.toml").is_file():
        return source
    return None


def register_model(cls: type | None = None) -> None:
    """Register ``gear-hf`` after lm-eval's built-ins: a lazy placeholder, or ``cls`` itself.

    Idempotent: does nothing when the name is already registered (by this hook, by the
    ``lm_eval.models`` entry point of newer lm-eval releases, or by anything else).
    """
    import lm_eval.models  # noqa: F401  registers the built-in lazy placeholders first
    from lm_eval.api.registry import model_registry

    if MODEL_NAME in model_registry:
        return
    try:
        if cls is not None:
            model_registry.register(MODEL_NAME)(cls)
        else:
            _register_placeholder(model_registry, MODEL_NAME, MODEL_TARGET)
    except (ValueError, TypeError) as exc:  # e.g. a frozen registry
        sys.stderr.write(f"lm_eval_gear: could not register {MODEL_NAME!r}: {exc}\n")


def _register_placeholder(registry: Any, name: str, target: str) -> None:
    params = inspect.signature(registry.register).parameters
    if "target" in params:
        registry.register(name, target=target)
    elif "lazy" in params:  # some lm-eval revisions call it lazy=
        registry.register(name, lazy=target)
    else:
        raise TypeError("unknown Registry.register signature")


def patch_task_manager(task_manager_cls: type) -> None:
    """Make ``TaskManager`` index the GEAR task folder whenever it indexes lm-eval's own tasks."""
    if getattr(task_manager_cls, _PATCH_MARK, False):
        return
    folder = tasks_dir()
    if folder is None:
        return
    original = task_manager_cls.__init__
    signature = inspect.signature(original)
    if "include_path" not in signature.parameters:
        return
    param = signature.parameters.get("include_defaults")
    defaults_by_default = True if param is None else param.default

    def __init__(self, *args, **kwargs):  # noqa: N807
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        if bound.arguments.get("include_defaults", defaults_by_default) is not False:
            bound.arguments["include_path"] = _with_folder(bound.arguments.get("include_path"), folder)
        return original(*bound.args, **bound.kwargs)

    __init__.__doc__ = original.__doc__
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    task_manager_cls.__init__ = __init__
    setattr(task_manager_cls, _PATCH_MARK, True)


def _with_folder(include_path: Any, folder: Path) -> list:
    if include_path is None:
        paths: list = []
    elif isinstance(include_path, (list, tuple)):
        paths = list(include_path)
    else:
        paths = [include_path]
    for p in paths:
        try:
            if Path(p).resolve() == folder:
                return paths
        except (OSError, TypeError):
            continue
    # ours first: lm-eval indexes paths in order and later ones win, so --include_path still
    # overrides a GEAR task of the same name
    return [str(folder), *paths]


def patch_cli_config(config_cls: type) -> None:
    """Check ``gear-hf``'s ``--model_args`` as soon as lm-eval's CLI has parsed them.

    lm-eval builds its task index before it constructs the model; a bad GEAR option would only
    surface after that, inside a traceback. This stops the run right after argument parsing with
    one line naming the option and its valid values (exit status 2, like argparse's errors).
    ``GearHFLM`` validates the same way again, for the Python API.

    lm-eval's response cache (``--use_cache PATH``) keys a response by its request alone, so a run
    with other GEAR options would read this one's answers: the path gets the config's tag
    (``PATH_gear-<digest>``), and every configuration its own file.

    It also stops a task that cannot run offline (:func:`offline_tasks_problem`), and names the
    embedded model's tokenizer for the tasks when the run names none (:func:`_name_embedded_tokenizer`).
    """
    if getattr(config_cls, _PATCH_MARK, False):
        return
    original = config_cls.__dict__.get("from_cli")
    if not isinstance(original, classmethod):
        return
    func = original.__func__

    def from_cli(cls, *args, **kwargs):
        cfg = func(cls, *args, **kwargs)
        if getattr(cfg, "model", None) == MODEL_NAME:
            use_cache = _check_cli_model_args(getattr(cfg, "model_args", None), getattr(cfg, "use_cache", None))
            if use_cache is not None:
                cfg.use_cache = use_cache
            problem = offline_tasks_problem(getattr(cfg, "tasks", None))
            if problem:
                sys.stderr.write(f"lm_eval: error: {problem}\n")
                raise SystemExit(2)
            _name_embedded_tokenizer(cfg)
        return cfg

    from_cli.__doc__ = func.__doc__
    config_cls.from_cli = classmethod(from_cli)
    setattr(config_cls, _PATCH_MARK, True)


def _check_cli_model_args(model_args: Any, use_cache: str | None) -> str | None:
    """Exit with one line on a bad option; else the --use_cache path tagged with the config."""
    from gear_kernels import GearConfigError

    from .model_args import check_model_args, fidelity_option, response_cache_tag
    from .smollm2 import EmbeddedModelMissing

    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    model_args = model_args or {}
    try:
        config = check_model_args(model_args)
        if use_cache and fidelity_option(model_args):
            raise GearConfigError(
                "gear-hf: fidelity=true compares every request with the exact run, and --use_cache "
                "would answer some from the response cache without either run: drop one of them"
            )
    except (GearConfigError, EmbeddedModelMissing) as exc:
        sys.stderr.write(f"lm_eval: error: {exc}\n")
        raise SystemExit(2) from None
    if not use_cache:
        return None
    tag = response_cache_tag(config, model_args.get("pretrained"), model_args)
    return use_cache if str(use_cache).endswith(tag) else f"{use_cache}{tag}"


def _name_embedded_tokenizer(cfg: Any) -> None:
    """Give the tasks the embedded model's tokenizer when the run names none (no ``pretrained``).

    lm-eval hands every task the run's metadata (``--model_args`` merged with ``--metadata``), and
    tasks that size their data with a tokenizer (RULER) take its ``tokenizer``, else
    ``pretrained``, else ``model``, loading it by name with ``AutoTokenizer``. The embedded model
    is a GGUF file, which that cannot read: its tokenizer, saved once as transformers saves
    tokenizers, goes into the metadata as ``tokenizer``, so the tasks count tokens as the model
    does. Only the tasks see it; the model reads its GGUF file as before.
    """
    metadata = getattr(cfg, "metadata", None)
    if not isinstance(metadata, dict):
        return
    from lm_eval.tasks.ruler.common_utils import resolve_tokenizer_name  # the tasks' own rule

    if resolve_tokenizer_name(metadata) is None:
        from .smollm2 import smollm2_tokenizer_dir

        cfg.metadata = {**metadata, "tokenizer": str(smollm2_tokenizer_dir())}


def offline_tasks_problem(tasks: Any) -> str | None:
    """What stops the asked lm-eval tasks while the hub is offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE), in one line, or None. lm-eval would load the model first and then fail
    in a traceback. Two kinds of task stop here: one with a shipped twin whose hub dataset the
    local cache does not hold, and a RULER task (or group) that downloads what this machine holds
    no copy of. Cheap: nothing but the names and, only for such tasks, a look into local caches."""
    names = tasks.split(",") if isinstance(tasks, str) else [t for task in tasks or () for t in str(task).split(",")]
    problems = [problem for check in (_stranded_twins, _stranded_ruler) if (problem := check(names))]
    return "; ".join(problems) or None


def _hub_offline() -> bool:
    import datasets.config  # it reads both variables

    return bool(datasets.config.HF_HUB_OFFLINE)


def _stranded_twins(names: list[str]) -> str | None:
    """The tasks with a shipped twin whose hub dataset cannot be read, and their twins."""
    twins = {name: twin for name in names if (twin := _shipped_twin(name)) is not None}
    if not twins or not _hub_offline():
        return None
    stranded = {name: twin for name, (twin, dataset) in twins.items() if not _in_datasets_cache(dataset)}
    if not stranded:
        return None
    reads = " and ".join(f"{name} reads {twins[name][1]}" for name in stranded)
    theirs = "its twin" if len(stranded) == 1 else "their twins"
    return (
        f"{reads} from the Hugging Face hub, which is offline here (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and "
        f"holds no copy in the local cache: use --tasks {','.join(stranded.get(n, n) for n in names)}, {theirs} "
        "shipped with lm-eval-gear (the same test set, few-shot chain of thought; nothing to download)"
    )


def _stranded_ruler(names: list[str]) -> str | None:
    """The RULER tasks that would download what is not here, and the RULER tasks that run offline."""
    needs = {name: downloads for name in names if (downloads := _ruler_downloads(name))}
    if not needs or not _hub_offline():
        return None
    absent = {download for download in set().union(*needs.values()) if not download.cached()}
    missing = {name: [d.what for d in downloads if d in absent] for name, downloads in needs.items()}
    reads = ", and ".join(f"{name} needs {_listed(whats)}" for name, whats in missing.items() if whats)
    if not reads:
        return None
    offline = ", ".join(name for name, downloads in RULER_DOWNLOADS.items() if not downloads)
    return (
        f"{reads}: downloads that this offline run (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) cannot make, and no "
        f"copy is on this machine; the RULER tasks that run offline are {offline} (they build their data locally)"
    )


def _listed(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(filter(None, (", ".join(items[:-1]), items[-1])))


def _ruler_downloads(name: str) -> tuple[Download, ...]:
    """What lm-eval's RULER task or group `name` downloads to build its data (any other task: nothing)."""
    if name in RULER_GROUPS:
        return tuple(dict.fromkeys(d for downloads in RULER_DOWNLOADS.values() for d in downloads))
    return RULER_DOWNLOADS.get(name, ())


def _shipped_twin(name: str) -> tuple[str, str] | None:
    """(the shipped task mirroring lm-eval's task `name`, the hub dataset `name` reads), or None."""
    for prefix, (ours, dataset) in HUB_TWINS.items():
        if name == prefix or name.startswith(prefix + "_"):
            twin = ours + name[len(prefix):]
            return (twin, dataset) if twin in shipped_tasks() else None
    return None


@functools.cache
def shipped_tasks() -> frozenset[str]:
    """The task and group names of the GEAR task folder, read off its YAMLs (not loaded)."""
    folder = tasks_dir()
    names = set()
    for path in folder.rglob("*.yaml") if folder is not None else ():
        # the first `task: name` or `group: name` line (a `task:` list names the group's members)
        found = re.search(r"^(?:task|group):[ \t]*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        if found:
            names.add(found.group(1))
    return frozenset(names)


def _in_datasets_cache(dataset: str) -> bool:
    """Whether datasets, offline, finds `dataset` in its local cache (it looks there and nowhere
    else); nothing is read but the cache's folder names."""
    from datasets.load import CachedDatasetModuleFactory

    try:
        CachedDatasetModuleFactory(dataset).get_module()
    except FileNotFoundError:
        return False
    return True


def patch_results_naming(tracker_cls: type) -> None:
    """Name a gear-hf run on the embedded default model after that model, not at random.

    lm-eval's ``GeneralConfigTracker`` takes the results folder's name from ``pretrained`` (or
    ``peft``, ``model``, ...) in ``--model_args``, and makes one up when there is none.
    """
    if getattr(tracker_cls, _PATCH_MARK, False):
        return
    original = tracker_cls.log_experiment_args
    name_of = getattr(tracker_cls, "_get_model_name", None)
    if name_of is None:
        return

    def log_experiment_args(self, model_source, model_args, *args, **kwargs):
        original(self, model_source, model_args, *args, **kwargs)
        if model_source == MODEL_NAME and name_of(model_args) is None:
            from lm_eval.utils import sanitize_model_name

            from .smollm2 import MODEL_NAME as EMBEDDED

            self.model_name = EMBEDDED
            self.model_name_sanitized = sanitize_model_name(EMBEDDED)

    log_experiment_args.__doc__ = original.__doc__
    tracker_cls.log_experiment_args = log_experiment_args
    setattr(tracker_cls, _PATCH_MARK, True)


def on_import(name: str, module: ModuleType) -> None:
    """Called by the start-up hook right after a watched lm-eval module has been executed."""
    if name == "lm_eval.api.registry":
        register_model()
    elif name == "lm_eval.tasks.manager":
        task_manager = getattr(module, "TaskManager", None)
        if task_manager is not None:
            patch_task_manager(task_manager)
    elif name == "lm_eval.config.evaluate_config":
        config = getattr(module, "EvaluatorConfig", None)
        if config is not None:
            patch_cli_config(config)
    elif name == "lm_eval.loggers.evaluation_tracker":
        tracker = getattr(module, "GeneralConfigTracker", None)
        if tracker is not None:
            patch_results_naming(tracker)


def install() -> None:
    """Register everything now or as soon as lm-eval is imported (for processes without the .pth)."""
    if "lm_eval.api.registry" in sys.modules:
        register_model()
    if "lm_eval.tasks.manager" in sys.modules:
        patch_task_manager(sys.modules["lm_eval.tasks.manager"].TaskManager)
    if "lm_eval.config.evaluate_config" in sys.modules:
        patch_cli_config(sys.modules["lm_eval.config.evaluate_config"].EvaluatorConfig)
    if "lm_eval.loggers.evaluation_tracker" in sys.modules:
        patch_results_naming(sys.modules["lm_eval.loggers.evaluation_tracker"].GeneralConfigTracker)
    try:
        import _lm_eval_gear_hook
    except ImportError:  # neither installed nor on sys.path: nothing more to watch for
        return
    _lm_eval_gear_hook.install(force=True)
