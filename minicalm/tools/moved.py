"""Modules that moved when the package split the lesson (minicalm/) from the machinery (io/, tasks/, tools/): an old
import keeps working, with a FutureWarning naming the new place, and `python -m` of an old command says which command
to run instead. Installed by minicalm/__init__.py."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {"files": "io.files", "hub": "io.hub", "weights": "io.weights", "tokenizer": "io.tokenizer",
         "adapter": "io.adapter", "task": "tasks.task", "data": "tasks.data", "score": "tasks.score",
         "evaluate": "tools.evaluate", "plan": "tools.plan", "plot": "tools.plot", "adapter_stats": "tools.adapter_stats"}
COMMANDS = {"plan": "plan", "plot": "plot", "adapter_stats": "stats", "adapter": "merge", "weights": "convert"}


class Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """minicalm.<old> is the module minicalm.<new> itself (one module object, so one of each class)."""

    def find_spec(self, name: str, path=None, target=None):
        package, _, old = name.partition(".")
        if package == "minicalm" and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        old = spec.name.partition(".")[2]
        module = importlib.import_module(f"minicalm.{MOVED[old]}")
        warnings.warn(f"minicalm.{old} moved to minicalm.{MOVED[old]}", FutureWarning, stacklevel=4)
        return module

    def exec_module(self, module) -> None:   # importlib gave the module the alias's spec: its own goes back
        module.__spec__ = importlib.util.find_spec(module.__name__)

    def get_code(self, name: str):   # python -m minicalm.<old>
        old = name.partition(".")[2]
        run = f"python -m minicalm {COMMANDS[old]}" if old in COMMANDS else f"import minicalm.{MOVED[old]}"
        raise ImportError(f"{name} moved to minicalm.{MOVED[old]}: {run}")


def install() -> None:
    if not any(isinstance(f, Moved) for f in sys.meta_path):
        sys.meta_path.append(Moved())
