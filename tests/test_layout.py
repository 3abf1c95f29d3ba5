"""The package's shape, as the README says it is: the lesson at the top of minicalm/ in reading order and the machinery
in io/, tasks/ and tools/; the lesson imports from the machinery only at its stated border; the README's line counts
are the files'; the imports make no circle; no library function takes more than 8 parameters; the old module paths
and commands lead to the new ones; `import minicalm` is a plain list of imports (no hook)."""
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
    assert f"hold {six:,} lines together" in readme and six <= 1150
    assert f"about {round(six, -2):,} lines to read" in readme   # the introduction's figure is the table's


def modules() -> dict[str, object]:
    """minicalm's modules by dotted name (a package by its own name), and their files."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_the_imports_make_no_circle():
    """Module-level and function-level imports alike: nothing the lesson or the machinery imports imports it back
    (a package's __init__, which lists the public API, is no module of its own here)."""
    mods = modules()
    edges = {name: {m for m in imported(path) if m in mods and m != name and mods[m].name != "__init__.py"}
             for name, path in mods.items() if path.name != "__init__.py"}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for m in sorted(edges.get(name, ())):
            assert state.get(m) != "open", "an import circle: " + " -> ".join(path[path.index(m):] + [name, m])
            if m not in state:
                visit(m, path + [name])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


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


def test_old_module_paths_say_where_they_went_and_import_minicalm_installs_no_hook():
    for old, says in (("plan", "minicalm.plan moved to minicalm.tools.plan: python -m minicalm plan"),
                      ("data", "minicalm.data moved to minicalm.tasks.data: import minicalm.tasks.data")):
        done = run("-m", f"minicalm.{old}")
        assert done.returncode == 1 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    done = run("-c", "import sys, minicalm; print(len(sys.meta_path), minicalm.load_model.__module__, "
                     "minicalm.evaluate_rows.__module__)")
    plain = run("-c", "import sys; print(len(sys.meta_path))")
    assert done.stdout.split() == [plain.stdout.strip(), "minicalm.io.weights", "minicalm.tools.evaluate"], done.stderr
    gone = run("-c", "import minicalm.data")   # an old import is a plain one; the README's table says where it went
    assert gone.returncode == 1 and "ModuleNotFoundError: No module named 'minicalm.data'" in gone.stderr


def test_the_commands_run_as_python_m_minicalm():
    listing = run("-m", "minicalm")
    assert listing.returncode == 1 and all(c in listing.stderr for c in ("generate", "merge", "convert", "plan",
                                                                         "plot", "stats", "serve"))
    done = run("-m", "minicalm", "generate", "--help")
    assert done.returncode == 0 and "--adapter" in done.stdout and "--max-new-tokens" in done.stdout
    done = run("-m", "minicalm.generate", "--help")   # the module says where the command is, in one line
    assert (done.returncode, done.stderr) == (1, "python -m minicalm.generate: the command is `python -m minicalm "
                                                 "generate` (--help lists its flags)\n")
    done = run("-m", "minicalm", "serve", "--help")
    assert done.returncode == 0 and "--adapter ADAPTER" in done.stdout and "repeat the flag" in done.stdout
