"""The optional dependencies: which extra brings each one, and the one error a missing one gives.

``pip install nvfp4kit`` installs the core (torch, numpy, safetensors, typer, rich): the format core,
``formats``, ``model``, ``convert`` and ``inspect`` (without ``--against`` / ``--plot``) run on it.
Loading Hugging Face / GGUF models, reading dataset-format text and drawing charts need the ``hf``
extra. Library code imports such a module through :func:`require`, so a missing one stops with
:class:`MissingDependency` (the module, what needed it, the extra to install) instead of a raw
``ModuleNotFoundError`` traceback; the CLI prints it as one line naming the command.

    transformers = require("transformers", "loading Hugging Face models")
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the nvfp4kit extra (pyproject.toml [project.optional-dependencies]) that installs it
EXTRA_OF = {
    "transformers": "hf",
    "datasets": "hf",
    "gguf": "hf",
    "accelerate": "hf",
    "matplotlib": "hf",
}


class MissingDependency(ImportError):
    """An optional module is not installed; ``str()`` says which extra brings it."""

    def __init__(self, module: str, purpose: str, extra: str | None = None):
        self.module, self.purpose = module, purpose
        self.extra = extra if extra is not None else EXTRA_OF.get(module)
        super().__init__(f"{self.purpose} needs {module}, which is not installed: {self.install_hint}",
                         name=module)

    @property
    def install_hint(self) -> str:
        return f"pip install 'nvfp4kit[{self.extra}]'" if self.extra else f"pip install {self.module}"

    def for_command(self, command: str) -> str:
        """The one line the CLI prints: ``nvfp4kit train needs the 'hf' extra (...): pip install ...``."""
        needs = f"the '{self.extra}' extra" if self.extra else self.module
        return (f"{command} needs {needs} ({self.module} is not installed; used for {self.purpose}): "
                f"{self.install_hint}")


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a top-level optional dependency or a submodule of one), or raise
    :class:`MissingDependency` naming ``purpose`` and the extra that installs it. A module that is
    installed but fails on import for another reason raises that error unchanged."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # only the module itself (or its package) missing counts; a broken dependency of it is not ours
        missing = getattr(e, "name", None)
        if missing is not None and missing.split(".")[0] != top:
            raise
        raise MissingDependency(top, purpose) from None


def require_all(modules, purpose: str) -> None:
    """:func:`require` each of ``modules`` before any work starts (a command's unconditional needs)."""
    for m in modules:
        require(m, purpose)
