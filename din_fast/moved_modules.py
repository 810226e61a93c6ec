"""Old import paths of the CTR application, kept working.

After release 0.2.0, the application moved (data, training, checkpoints, models,
predict, export, serving, the CLI, the sharded trainer) from ``din_fast.X``
to ``din_fast.ctr.X``, so that the attention library stands apart from it.
Code written against the old paths (``from din_fast.training import train``,
``import din_fast.sharded.model``) keeps working: importing an old name gives
the module of the new one itself, not a copy, so classes, ``isinstance`` and
monkeypatching see one module. Nothing of the application is imported until
an old name is.
"""

import importlib
import importlib.abc
import importlib.util
import sys

PACKAGE = "din_fast"
APPLICATION = "din_fast.ctr"
MOVED = frozenset({
    "checkpoint", "cli", "config", "data", "errors", "export", "files", "foreign_data",
    "labeled_loader", "labeled_samples", "loaders", "metrics", "models", "onnx_export",
    "package_inputs", "plot", "predict", "run_log", "serving", "sharded", "training",
})


def new_name(old_name: str):
    """``din_fast.ctr.X[.Y]`` for a moved ``din_fast.X[.Y]``, else None."""
    parts = old_name.split(".")
    if len(parts) < 2 or parts[0] != PACKAGE or parts[1] not in MOVED:
        return None
    return APPLICATION + old_name[len(PACKAGE):]


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as its new module: the import system
    creates a placeholder, and exec_module puts the new module in its place in
    sys.modules, which the import system then returns (it reads sys.modules
    back after exec_module for this reason), leaving the new module's own
    ``__spec__`` and ``__name__`` as they are."""

    def find_spec(self, fullname, path=None, target=None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None     # the default placeholder module

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(new_name(module.__name__))


def install() -> None:
    """Put the finder first on sys.meta_path, once: before the path finder,
    which would otherwise load ``din_fast.sharded.model`` a second time from
    the new package's folder under the old name."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
