"""Where the modules went when the package split the lesson (minicalm/) from the machinery (io/, tasks/, tools/), said
where a user meets an old path: `python -m minicalm.plan` (and the others) answers in one line with the command or
module to use. Installed by minicalm/__init__.py only while `python -m minicalm.X` is being looked for, never on a
plain import; the README's "Where things moved" has the table."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {"files": "io.files", "hub": "io.hub", "weights": "io.weights", "tokenizer": "io.tokenizer",
         "adapter": "io.adapter", "task": "tasks.task", "data": "tasks.data", "score": "tasks.score",
         "evaluate": "tools.evaluate", "plan": "tools.plan", "plot": "tools.plot", "adapter_stats": "tools.adapter_stats"}
COMMANDS = {"plan": "plan", "plot": "plot", "adapter_stats": "stats", "adapter": "merge", "weights": "convert"}


class Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds minicalm.<old> only to say where it went."""

    def find_spec(self, name: str, path=None, target=None):
        package, _, old = name.partition(".")
        return importlib.util.spec_from_loader(name, self) if package == "minicalm" and old in MOVED else None

    def moved(self, name: str) -> ImportError:
        old = name.partition(".")[2]
        run = f"python -m minicalm {COMMANDS[old]}" if old in COMMANDS else f"import minicalm.{MOVED[old]}"
        return ImportError(f"{name} moved to minicalm.{MOVED[old]}: {run}")

    def create_module(self, spec):
        raise self.moved(spec.name)

    def get_code(self, name: str):   # what runpy asks for `python -m minicalm.<old>`
        raise self.moved(name)


def install() -> None:
    # `python -m minicalm.generate` runs a module the package has imported already: runpy's warning about that is
    # noise here (generate.py's __main__ only points to `python -m minicalm generate`)
    warnings.filterwarnings("ignore", r"'minicalm\.", RuntimeWarning, "runpy")
    if not any(isinstance(f, Moved) for f in sys.meta_path):
        sys.meta_path.append(Moved())
