"""The package's shape, as the README says it is: the lesson at the top of minicalm/ in reading order and the machinery
in io/, tasks/ and tools/; the lesson imports from the machinery only at its stated border; the README's line counts
are the files'; no library function takes more than 8 parameters; the old module paths and commands lead to the new
ones."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "minicalm"
LESSON = ["config", "model", "lora", "multi_lora", "variants", "nf4", "loss", "generate", "engine",
          "train"]   # the README's reading order
MACHINERY = ("minicalm.io", "minicalm.tasks", "minicalm.tools")
BORDER = {   # a lesson module: the machinery it imports, where it must read, save or hand over to a command
    "config": {"minicalm.io.files"},   # config.json
    "generate": {"minicalm.tools.commands"},   # python -m minicalm.generate
    "train": {"minicalm.io.adapter", "minicalm.io.files", "minicalm.io.tokenizer", "minicalm.io.weights",
              "minicalm.tasks.data", "minicalm.tasks.task", "minicalm.tools.evaluate", "minicalm.tools.plan",
              "minicalm.tools.run"},
}


def imported(path) -> set[str]:
    """The minicalm modules a file imports (relative imports resolved), anywhere in it."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    modules = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in PACKAGE.rglob("*.py")}
    return found & modules


def test_the_lesson_is_the_top_of_the_package_and_imports_the_machinery_only_at_its_border():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top == set(LESSON) and len(top) + 2 <= 12
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {"io", "tasks", "tools"}
    for name in LESSON:
        machinery = {m for m in imported(PACKAGE / f"{name}.py") if m.startswith(MACHINERY)}
        assert machinery <= BORDER.get(name, set()), f"minicalm/{name}.py imports {machinery - BORDER.get(name, set())}"
    assert not [m for m in imported(PACKAGE / "lora.py") if "nf4" in m]   # a quantized base is just a base layer


def test_the_readme_s_line_counts_are_the_files():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (?:\d+ \| )?`minicalm/([\w/]+\.py)` \| (\d+) \|", readme, re.M))
    files = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")} - {"__init__.py", "__main__.py"}
    assert set(rows) == {f for f in files if not f.endswith("__init__.py")}
    lines = {f: len((PACKAGE / f).read_text(encoding="utf-8").splitlines()) for f in rows}
    assert {f: int(n) for f, n in rows.items()} == lines
    six = sum(lines[f"{m}.py"] for m in ("model", "lora", "variants", "loss", "generate", "train"))
    assert f"hold {six:,} lines together" in readme and six <= 1200


def test_no_library_function_takes_more_than_8_parameters():
    for path in PACKAGE.rglob("*.py"):
        for f in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(f, ast.FunctionDef):
                a = f.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                n = len(names) - (names[:1] in (["self"], ["cls"]))
                assert n <= 8, f"{path.relative_to(ROOT)}: {f.name} takes {n} parameters"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_old_module_paths_lead_to_the_new_ones():
    done = run("-W", "always", "-c", "import minicalm.data, minicalm.tasks.data as new; assert minicalm.data is new; "
                                     "from minicalm.adapter import load_adapter; from minicalm.lora import "
                                     "trainable_parameters; print(load_adapter.__module__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "minicalm.io.adapter"
    assert "FutureWarning: minicalm.data moved to minicalm.tasks.data" in done.stderr
    assert "FutureWarning: minicalm.adapter moved to minicalm.io.adapter" in done.stderr
    old = run("-m", "minicalm.plan")
    assert old.returncode == 1 and "minicalm.plan moved to minicalm.tools.plan: python -m minicalm plan" in old.stderr


def test_the_commands_run_as_python_m_minicalm():
    listing = run("-m", "minicalm")
    assert listing.returncode == 1 and all(c in listing.stderr for c in ("generate", "merge", "convert", "plan",
                                                                         "plot", "stats", "serve"))
    for args in (("-m", "minicalm.generate", "--help"), ("-m", "minicalm", "generate", "--help")):
        done = run(*args)
        assert done.returncode == 0 and "--adapter" in done.stdout and "--max-new-tokens" in done.stdout
    done = run("-m", "minicalm", "serve", "--help")
    assert done.returncode == 0 and "--adapter ADAPTER" in done.stdout and "repeat the flag" in done.stdout
