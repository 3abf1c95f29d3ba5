"""The README runs as written. Its LoRA recipe runs and does what it says; and every command of its `bash` blocks
runs, in order, as a subprocess in an empty folder against the stand-in hub (tests/hub.py), each checked by what it
wrote, not only by its exit code. Marks in the README's source (an HTML comment before a block) say which commands
cannot run here and why (`skip: MATCH | reason`), which are shortened (`add: MATCH | flags | reason`) and which
python blocks run as steps (`run`)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT
from minicalm.io.adapter import adapter_base
from minicalm.config import POST_MODEL, CalmConfig
from minicalm.tools.evaluate import EvalConfig
from minicalm.io.files import read_json, read_records
from minicalm.tasks.task import BUILTIN, load_task
from minicalm.train import TrainConfig

README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test\n(?P<marks>.*?)-->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the recipe

def test_readme_lora_recipe_runs(hub_env, tmp_path, monkeypatch):
    """The dozen lines as written, on the stand-in OpenCALM-7B and MARC-ja; only the device changes (no GPU here)."""
    code = re.search(r"## LoRA in a dozen lines.*?```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)[1]
    setting = 'MODEL, DEVICE = "cyberagent/open-calm-7b", "cuda"'
    assert setting in code
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # ~/.cache/minicalm, where MARC-ja is converted
    scope = {}
    exec(compile(code.replace(setting, 'MODEL, DEVICE = "cyberagent/open-calm-7b", "cpu"'), "README.md", "exec"), scope)

    # 4. the adapter is trained, in PEFT's key layout, for its base; 5. the merged folder is a plain checkpoint
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.gpt_neox.layers.") for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert adapter_base(tmp_path / "adapter") == (POST_MODEL, None)
    merged = scope["minicalm"].load_model(tmp_path / "merged", dtype=torch.bfloat16)
    x = torch.randint(0, 50_000, (1, 12))
    with torch.no_grad():
        assert torch.equal(merged(x), scope["model"].eval()(x))


# ----------------------------------------------------------------------------- the commands

@dataclass
class Step:
    line: int              # where it stands in the README
    kind: str              # "bash" or "python"
    text: str              # the command (continuation lines joined) or the python code
    skip: str | None = None
    add: str = ""          # flags appended to shorten a long run


def readme_steps(text: str) -> list[Step]:
    """Every bash command and every python block marked `run`, in README order, with their marks applied to the
    commands of their block that contain MATCH. A mark that matches nothing (a stale one) fails."""
    steps = []
    for m in BLOCK.finditer(text):
        line = text[:m.start("body")].count("\n") + 1
        marks = [ln.strip() for ln in (m["marks"] or "").splitlines() if ln.strip()]
        if m["lang"] == "python":
            if "run" in marks:
                steps.append(Step(line, "python", m["body"]))
            continue
        if m["lang"] != "bash":
            continue
        commands = [c.strip() for c in m["body"].replace("\\\n", " ").splitlines() if c.strip()]
        block = [Step(line, "bash", c) for c in commands]
        for mark in marks:
            kind, _, rest = mark.partition(":")
            match, *what = [part.strip() for part in rest.split("|")]
            hits = [s for s in block if match in s.text]
            assert hits and kind in ("skip", "add") and what, f"README.md:{line}: bad mark {mark!r}"
            for hit in hits:
                hit.skip, hit.add = (what[0], hit.add) if kind == "skip" else (hit.skip, what[0])
        steps += block
    return steps


@dataclass
class Ran:
    """One command's run: the command, its argv after the script, the folder, its output, the hub requests it made."""
    command: str
    args: list[str]
    cwd: Path
    env: dict
    stdout: str
    stderr: str
    requests: list

    def path(self, p: str) -> Path:
        return self.cwd / p

    def flag(self, name: str, default=None):
        """The flag's value as the program took it: the last one given (a test's added flags come after)."""
        return next((self.args[i + 1] for i in reversed(range(len(self.args) - 1)) if self.args[i] == name), default)


def words(command: str, cwd: Path, env: dict) -> list[str]:
    """The command's words as bash hands them to the program: quotes removed, $VAR, ~ and $'\\t' expanded."""
    done = subprocess.run(["bash", "-c", f"set -- {command}; printf '%s\\0' \"$@\""], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


def program(argv: list[str]) -> tuple[str, list[str]]:
    """("train_lora.py", its args) for "python train_lora.py ...", ("minicalm plot", args) for "python -m minicalm plot
    ...", ("minicalm.generate", args) for "python -m minicalm.generate ..."."""
    while "=" in argv[0]:   # NAME=value before the command
        argv = argv[1:]
    assert argv[0] == "python", f"the README's commands run python: {argv}"
    if argv[1] != "-m":
        return argv[1], argv[2:]
    return (f"minicalm {argv[3]}", argv[4:]) if argv[2] == "minicalm" else (argv[2], argv[3:])


def check_train(r: Ran) -> None:
    out = r.path(r.flag("--out", TrainConfig.out))
    cfg = read_json(out / "adapter" / "adapter_config.json")
    model = r.flag("--model", POST_MODEL)   # a local folder is recorded whole, so the adapter finds it from anywhere
    model = str(r.path(model).resolve()) if r.path(model).exists() else model
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == (model, r.flag("--revision"))
    records = read_records(out / "metrics.jsonl")
    assert records and all(math.isfinite(x["loss"]) for x in records) and "val_loss" in records[-1]
    assert f"done: {records[-1]['step']} steps" in r.stderr
    task = r.flag("--task", "marc-ja")
    expected = load_task(task if task in BUILTIN else r.path(task)).name
    assert read_json(out / "adapter" / "task.json")["name"] == expected
    if r.flag("--revision") == "refs/pr/5":   # the safetensors only: none of main's pickles
        assert not [q for q in r.requests if q.path.endswith(".bin")] and r.requests


def check_suite(r: Ran) -> None:
    """A suite: each task's own evaluation in its folder, suite.json's numbers theirs, suite.md a row per task."""
    from minicalm.tools.suite import SUITES, TITLES, headline
    out, names = r.path(r.flag("--out", EvalConfig.out)), SUITES[r.flag("--suite")]
    suite = read_json(out / "suite.json")
    run = "adapter" if r.flag("--adapter") else "base"
    assert list(suite["tasks"]) == list(names) and suite["shots"] == int(r.flag("--shots", 0))
    for name in names:
        metrics = read_json(out / name / "metrics.json")
        assert metrics["task"]["name"] == name and (out / name / "report.md").is_file()
        assert suite["tasks"][name] == headline(load_task(name), metrics[run])
    table = (out / "suite.md").read_text(encoding="utf-8")
    assert [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| ") and " | " in line][1:] \
        == [TITLES[n] for n in names]
    assert all(f"[{i}/{len(names)}] {n}" in r.stderr for i, n in enumerate(names, 1))   # progress across tasks


def check_eval(r: Ran) -> None:
    if r.flag("--suite"):
        return check_suite(r)
    out, adapter = r.path(r.flag("--out", EvalConfig.out)), r.flag("--adapter")
    metrics = read_json(out / "metrics.json")
    runs = ["base", "adapter"] if "--compare-base" in r.args else ["adapter" if adapter else "base"]
    preds = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(preds) == metrics["n_rows"] * len(runs) > 0 and all(k in metrics for k in runs)
    report = (out / "report.md").read_text(encoding="utf-8")
    if adapter and not r.flag("--model"):   # the base and revision the adapter recorded
        assert (metrics["model"], metrics["revision"]) == adapter_base(r.path(adapter))
    name, shots = Path(metrics["model"].rstrip("/")).name, f", {r.flag('--shots')}-shot" if r.flag("--shots") else ""
    assert (f"| {name} before fine-tuning{shots} |" in report) == ("base" in runs)
    assert (f"| {name} + LoRA ({adapter}){shots} |" in report) == bool(adapter)
    if metrics["task"].get("answer_field"):   # free-form: scored by exact match and character F1, rows shown
        assert all({"exact_match", "char_f1", "answer_loss"} <= metrics[k].keys() for k in runs)
        assert "| model | exact match | char F1 | answer loss | empty answers |" in report and "- gold " in report
    assert f"({metrics['n_rows']} rows, task {metrics['task']['name']}{shots})" in report
    if r.command.startswith("HF_HUB_OFFLINE=1"):
        assert r.requests == []   # everything from the cache


VALUE_FLAGS = {"--model", "--revision", "--adapter", "--task", "--max-new-tokens", "--temperature", "--top-k",
               "--seed", "--max-len", "--device", "--dtype"}


def check_generate(r: Ran) -> None:
    texts = [a for i, a in enumerate(r.args) if not a.startswith("--") and r.args[i - 1] not in VALUE_FLAGS]
    if "--raw" in r.args:
        assert len(texts) == 1 and r.stdout.startswith(texts[0]) and len(r.stdout.strip()) > len(texts[0])
        return
    adapter = r.flag("--adapter")
    given = r.flag("--task")
    task = load_task(given if given in BUILTIN else r.path(given) if given else
                     r.path(adapter) / "task.json" if adapter else r.path(r.flag("--model")) / "task.json")
    lines = r.stdout.splitlines()
    assert len(lines) == len(texts)
    if task.free_form:   # the answer, then the text
        assert all(line.endswith("\t" + text) for line, text in zip(lines, texts))
        return
    for line, text in zip(lines, texts):
        answer, written, probs, echoed = line.split("\t", 3)
        assert answer in (*task.labels, "invalid") and written.startswith("'") and echoed == text
        assert [p.split("=")[0] for p in probs.split()] == [f"p({label})" for label in task.labels]


def check_plot(r: Ran) -> None:
    plots = r.path(r.args[0]) / "plots"
    assert sorted(p.name for p in plots.glob("*.png")) == ["grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    assert all(p.read_bytes()[:8] == PNG for p in plots.glob("*.png"))


def check_stats(r: Ran) -> None:
    out = r.path(r.flag("--out"))
    stats = read_json(out / "adapter_stats.json")
    assert (stats["base"], stats["revision"]) == adapter_base(r.path(r.args[0]))   # fetched by the adapter's hub id
    assert stats["modules"] and all(m["relative_update"] > 0 for m in stats["modules"])
    pictures = ["singular_values.png", "update_per_layer.png"] + (["subspace_similarity.png"] * ("--compare" in r.args))
    assert sorted(p.name for p in out.glob("*.png")) == sorted(pictures)


def check_checkpoint(folder: Path) -> None:
    assert CalmConfig.from_json(folder / "config.json") and (folder / "tokenizer.json").is_file()
    assert load_file(folder / "model.safetensors")["embed_out.weight"].dtype == torch.float16


def check_merge(r: Ran) -> None:
    out = r.path(r.flag("--out"))
    check_checkpoint(out)
    assert read_json(out / "task.json") == read_json(r.path(r.args[0]) / "task.json")


def check_miniature(r: Ran) -> None:
    out = r.path(r.flag("--out"))
    if "--free-form" in r.args:   # the free-form story: before, k-shot and after, by exact match and char F1
        res = read_json(out / "free_form.json")
        assert all({"exact_match", "char_f1"} <= res[k].keys() for k in ("before", "k_shot", "after"))
        assert (out / "free_form.md").read_text(encoding="utf-8").count("| micro GPT-NeoX") == 3
        return
    if "--jglue" in r.args:   # JGLUE's other kinds: a multiple-choice task and a number, before and after LoRA
        res = read_json(out / "jglue.json")["stories"]
        assert {"accuracy", "accuracy_norm"} <= res["feeling-word"]["after"].keys()
        assert {"pearson", "spearman", "n_unparsable"} <= res["how-positive"]["after"].keys()
        assert (out / "jglue.md").read_text(encoding="utf-8").count("| feeling-word") == 1
        return
    if r.flag("--sweep-ranks") or r.flag("--sweep-variants"):
        runs = read_json(out / "sweep.json")["runs"]
        ranks = [int(x) for x in (r.flag("--sweep-ranks") or r.flag("--lora-r") or "16").split(",")]
        variants = (r.flag("--sweep-variants") or ("rslora" if "--use-rslora" in r.args else "lora")).split(",")
        assert [(x["r"], x.get("variant")) for x in runs] == [(k, v) for v in variants for k in ranks]
        assert (out / "sweep.md").read_text().count("\n") == len(runs) + 2 and (out / "losses.png").is_file()
        return
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "before LoRA" in report and "+ LoRA" in report and read_json(out / "results.json")["after"]


def check_plan(r: Ran) -> None:
    assert "plan for" in r.stdout and "fits in" in r.stdout, r.stdout


CHECKS = {"train_lora.py": check_train, "eval.py": check_eval, "minicalm generate": check_generate,
          "minicalm plot": check_plot, "minicalm stats": check_stats, "minicalm merge": check_merge,
          "minicalm convert": lambda r: check_checkpoint(r.path(r.args[1])), "minicalm plan": check_plan,
          "experiments/miniature.py": check_miniature}


def run_python_block(step: Step, cwd: Path, env: dict) -> str:
    """A python block marked `run`, as a script; it must write files, each valid JSON or JSON lines."""
    before = set(cwd.iterdir())
    done = subprocess.run([sys.executable, "-"], input=step.text, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"README.md:{step.line}: python block failed\n{done.stderr[-3000:]}"
    new = sorted(set(cwd.iterdir()) - before)
    assert new, f"README.md:{step.line}: the block wrote nothing"
    for f in new:
        lines = f.read_text(encoding="utf-8").splitlines() if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]
        assert lines and all(json.loads(ln) for ln in lines)
    return f"wrote {', '.join(f.name for f in new)}"


def test_readme_commands_run_as_written(standin_hub, hub_env, tmp_path):
    steps = readme_steps(README.read_text(encoding="utf-8"))
    cwd = tmp_path / "work"
    cwd.mkdir()
    for name in ("train_lora.py", "eval.py", "experiments", "bench"):   # a user runs them from the repository
        (cwd / name).symlink_to(ROOT / name)
    env = hub_env | {"HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    table, checked = [], set()
    for step in steps:
        if step.skip:
            table.append((step.line, step.text, "skipped", step.skip))
            continue
        t0 = time.time()
        if step.kind == "python":
            table.append((step.line, "python block", "0", run_python_block(step, cwd, env)))
            continue
        command = f"{re.sub(r'[ ]+#[ ].*$', '', step.text)} {step.add}".strip()   # the flags go before a comment
        argv = words(command, cwd, env)
        if all("=" in a for a in argv):   # NAME=value: for the commands after it
            env |= dict(a.split("=", 1) for a in argv)
            continue
        name, args = program(argv)
        assert name in CHECKS, f"README.md:{step.line}: no check for {name!r}; add one to CHECKS"
        standin_hub.log.clear()
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README.md:{step.line}: {command}\n{done.stderr[-3000:]}"
        CHECKS[name](Ran(step.text, args, cwd, env, done.stdout, done.stderr, list(standin_hub.log)))
        checked.add(name)
        last = (done.stdout.strip() or done.stderr.strip()).splitlines()[-1]
        table.append((step.line, step.text, f"0 in {time.time() - t0:.1f} s", last[:100]))
    print("\n".join(f"README.md:{line}  {text[:90]}\n    {status}: {out}" for line, text, status, out in table))
    assert checked == set(CHECKS)   # every kind of command the README shows ran at least once
