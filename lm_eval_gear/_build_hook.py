"""Build step (setuptools only, never imported at run time): ship ``lm_eval_gear_hook.pth``.

The .pth file sits at the root of site-packages and imports ``_lm_eval_gear_hook`` at
interpreter start-up (see that module and ``lm_eval_gear.registration``). setuptools has no
option for a root-level data file, so ``build_py`` writes it:

* regular wheels (``pip install .``): into ``build_lib``, whose root becomes site-packages;
* editable wheels (``pip install -e .``, PEP 660): straight into the unpacked editable wheel,
  which setuptools' ``editable_wheel`` has set as ``install.install_lib``; the package code
  itself stays in the source tree, reached through setuptools' own editable finder.

pyproject.toml names this class in ``[tool.setuptools] cmdclass``.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "lm_eval_gear_hook.pth"
# one line; site.py executes lines that start with "import". A missing hook module (a broken
# or half-removed install) must not print a traceback at every interpreter start-up.
PTH_LINE = 'import sys; exec("try:\\n    import _lm_eval_gear_hook\\nexcept Exception:\\n    pass")\n'


class BuildPyWithHook(build_py):
    def initialize_options(self) -> None:
        super().initialize_options()
        self._hook_outputs: list[str] = []

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            target = getattr(self.distribution.get_command_obj("install"), "install_lib", None)
            if target:
                self._write_pth(target)  # part of the editable wheel, not of build_lib's outputs
            else:
                self.warn(f"editable build: nowhere to put {PTH_NAME}; `lm_eval --model gear-hf` will not register")
            return
        self._hook_outputs.append(self._write_pth(self.build_lib))

    def _write_pth(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PTH_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
        return path

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *self._hook_outputs]
