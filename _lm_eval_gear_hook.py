"""Start-up hook that makes ``lm_eval --model gear-hf`` work with the stock ``lm_eval`` command.

Installed as the one line of ``lm_eval_gear_hook.pth`` in site-packages, so the interpreter
imports this module at start-up. It must stay tiny: it imports nothing beyond ``sys`` and
``os`` (both already loaded by then) and only puts a finder on ``sys.meta_path`` that ignores
every import except four lm-eval modules. Nothing of lm_eval_gear, lm_eval, torch or
transformers is loaded here; the cost for an unrelated Python process is one small module.

When one of the watched lm-eval modules is first imported, the finder lets the normal import
run and afterwards calls ``lm_eval_gear.registration.on_import``, which registers the
``gear-hf`` model (after lm-eval's built-in models, so ``--model hf`` keeps working), adds the
packaged GEAR task folder to lm-eval's task search path, and has the CLI check ``gear-hf``'s
``--model_args`` before it does anything slow.

Set ``LM_EVAL_GEAR_NO_HOOK=1`` to disable it for a process.
"""

import os
import sys

_PRIVATE = "_lm_eval_gear_registration"
_WATCHED = (
    "lm_eval.api.registry", "lm_eval.tasks.manager", "lm_eval.config.evaluate_config",
    "lm_eval.loggers.evaluation_tracker",
)


class _AfterImport:
    """Loader wrapper: runs the real loader, then hands the fresh module to lm_eval_gear."""

    def __init__(self, loader, name):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        # put the real loader back first so the module looks exactly as if we were not here
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try:
            _registration().on_import(self._name, module)
        except Exception as exc:  # never break lm_eval because of us
            sys.stderr.write(f"lm_eval_gear: could not hook into {self._name}: {exc!r}\n")

    def __getattr__(self, attr):
        return getattr(self._loader, attr)


def _registration():
    """``lm_eval_gear/registration.py``, run without running ``lm_eval_gear/__init__.py``.

    lm-eval processes that never ask for ``gear-hf`` (``lm_eval ls tasks``, ``--model vllm``)
    should pay for nothing of the package, whose exports load torch and transformers. The
    registration module needs only the standard library, so it is executed from its file as
    the private module ``_lm_eval_gear_registration`` (if the package is already imported, its
    own ``lm_eval_gear.registration`` is used). Its work is idempotent across both copies.
    """
    module = sys.modules.get("lm_eval_gear.registration") or sys.modules.get(_PRIVATE)
    if module is not None:
        return module
    import importlib.util

    package = importlib.util.find_spec("lm_eval_gear")  # locates it, does not execute it
    for folder in package.submodule_search_locations or []:
        path = os.path.join(folder, "registration.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(_PRIVATE, path)
            module = importlib.util.module_from_spec(spec)
            module.__package__ = "lm_eval_gear"  # its lazy relative imports load the real package
            sys.modules[_PRIVATE] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[_PRIVATE]
                raise
            return module
    raise ImportError("lm_eval_gear/registration.py not found")


class GearImportHook:
    """Meta path finder that reacts to the watched lm-eval modules and nothing else."""

    lm_eval_gear_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "lm_eval_gear_hook", False):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _AfterImport(spec.loader, fullname)
        return spec

    def invalidate_caches(self):
        pass


def install(force=False):
    """Put the finder first on sys.meta_path (once per process; the .pth call honours the opt-out)."""
    if not force and os.environ.get("LM_EVAL_GEAR_NO_HOOK", "") not in ("", "0"):
        return
    if any(getattr(f, "lm_eval_gear_hook", False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, GearImportHook())


install()
