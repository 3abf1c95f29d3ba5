"""A suite of tasks, the model loaded once: `python eval.py --suite jglue --adapter RUN/adapter --out DIR` evaluates
JGLUE's five tasks on their validation splits and puts the suite's table beside the published ones.

DIR/TASK/ holds each task's own evaluation (metrics.json, predictions.jsonl, report.md, as eval.py writes them), and
DIR/suite.json and DIR/suite.md the suite's numbers: one row per task, beside JGLUE's baselines and the JP LM
evaluation harness's open-calm rows. A task is finished when its metrics.json is there (written atomically, last);
a suite run into the same DIR again runs only the tasks that are not, so an interrupted suite resumes at the task it
stopped in. Each task is scored its own way: a label task by greedy answers (the post's measure) and by the label
words' likelihood (the harness's), a multiple-choice task by its choices' likelihood, a free-form one by its answers.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from ..config import SettingError
from ..io.adapter import base_for, load_adapter
from ..io.files import check_writable, read_json, write_json, write_text
from ..io.tokenizer import load_tokenizer
from ..io.weights import load_model, model_config
from ..tasks.task import NUMERIC, Task, load_task
from .evaluate import EvalConfig, evaluate_task, pct, prepare, run_eval

SUITES = {"jglue": ("marc-ja", "jsts", "jnli", "jsquad", "jcommonsenseqa")}
TITLES = {"marc-ja": "MARC-ja", "jsts": "JSTS", "jnli": "JNLI", "jsquad": "JSQuAD", "jcommonsenseqa": "JCommonsenseQA"}
# The flags that choose what one evaluation asks; a suite's tasks ask their own
OWN = ("task", "data", "mode", "max_new_tokens", "shots_file")
# The settings a finished task must have been run with to count for this run (the rest only say how it ran)
SAME = ("model", "revision", "adapter", "shots", "seed", "limit", "compare_base", "dtype", "quantize", "max_len")

# JGLUE's dev-set baselines (github.com/yahoojapan/JGLUE, README: fine-tuned encoders, and human performance)
BASELINES = {
    "marc-ja": [("Tohoku BERT base", {"accuracy": 0.958}), ("XLM-RoBERTa large", {"accuracy": 0.964})],
    "jsts": [("human", {"pearson": 0.899, "spearman": 0.861}), ("Tohoku BERT base", {"pearson": 0.909, "spearman": 0.868}),
             ("Waseda RoBERTa large (s128)", {"pearson": 0.930, "spearman": 0.896}),
             ("XLM-RoBERTa large", {"pearson": 0.918, "spearman": 0.884})],
    "jnli": [("human", {"accuracy": 0.925}), ("Tohoku BERT base", {"accuracy": 0.899}),
             ("XLM-RoBERTa large", {"accuracy": 0.919}), ("Waseda RoBERTa large", {"accuracy": 0.926})],
    "jsquad": [("human", {"exact_match": 0.871, "char_f1": 0.944}),
               ("Tohoku BERT base", {"exact_match": 0.871, "char_f1": 0.941}),
               ("NICT BERT base", {"exact_match": 0.897, "char_f1": 0.947}),
               ("Waseda RoBERTa large (s512)", {"exact_match": 0.918, "char_f1": 0.963})],
    "jcommonsenseqa": [("human", {"accuracy": 0.986}), ("Tohoku BERT base", {"accuracy": 0.808}),
                       ("Waseda RoBERTa large (s128)", {"accuracy": 0.907}), ("XLM-RoBERTa large", {"accuracy": 0.840})],
}
# The JP LM evaluation harness's open-calm results (Stability-AI/lm-evaluation-harness, branch jp-stable, prompt
# version 0.2; it has no JSTS): (model, shots, numbers). It scores label words by their likelihood, so its MARC-ja and
# JNLI accuracies stand beside our likelihood_accuracy; its JSQuAD F1 is its own.
HARNESS = {
    "marc-ja": [("open-calm-7b", 3, {"likelihood_accuracy": 0.7412}), ("open-calm-large", 3, {"likelihood_accuracy": 0.7912}),
                ("open-calm-medium", 3, {"likelihood_accuracy": 0.8357})],
    "jnli": [("open-calm-7b", 3, {"likelihood_accuracy": 0.3763}), ("open-calm-large", 3, {"likelihood_accuracy": 0.4084}),
             ("open-calm-medium", 3, {"likelihood_accuracy": 0.4232})],
    "jsquad": [("open-calm-7b", 2, {"exact_match": 0.4579, "char_f1": 0.5903}),
               ("open-calm-large", 3, {"exact_match": 0.3724, "char_f1": 0.4850}),
               ("open-calm-medium", 3, {"exact_match": 0.2873, "char_f1": 0.3980})],
    "jcommonsenseqa": [("open-calm-7b", 3, {"accuracy": 0.2422, "accuracy_norm": 0.2440}),
                       ("open-calm-large", 2, {"accuracy": 0.2994, "accuracy_norm": 0.2752}),
                       ("open-calm-medium", 2, {"accuracy": 0.3950, "accuracy_norm": 0.2869})],
}


def mode_of(task: Task) -> str:
    """How a suite scores a task: label words greedily and by likelihood, choices by likelihood, free text greedily."""
    return "both" if task.labels else "likelihood" if task.multiple_choice else "generate"


def headline(task: Task, m: dict) -> dict:
    """A run's numbers for the suite's table (m: one run's metrics, as metrics.json holds them)."""
    if task.labels:
        return {"accuracy": m["generate"]["accuracy"], "invalid_rate": m["generate"]["invalid_rate"],
                "likelihood_accuracy": m["likelihood"]["accuracy"], "n": m["generate"]["n"]}
    if task.multiple_choice:
        return {k: m[k] for k in ("accuracy", "accuracy_norm", "chance", "n")}
    keys = [k for k in task.metrics or () if k in NUMERIC] + ["n_unparsable"] if task.numeric else \
        ["exact_match", "char_f1"]
    return {k: m[k] for k in keys + ["n"]}


def say(cfg: EvalConfig, message: str) -> None:
    if cfg.log:
        print(message, file=sys.stderr, flush=True)


def finished(folder: Path, cfg: EvalConfig) -> dict | None:
    """A task's metrics.json from an earlier run of this suite, or None; one made with other settings is refused (its
    numbers would be mixed with this run's)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    earlier = read_json(path, "a finished task's metrics")
    theirs, ours = earlier.get("config", {}), dataclasses.asdict(cfg)
    differ = [k for k in SAME if k != "max_len" or ours[k] is not None if theirs.get(k) != ours[k]]
    if differ:
        k = differ[0]
        raise SettingError("EvalConfig", k, f"{path} was evaluated with {k} {theirs.get(k)!r}, this run asks "
                                            f"{ours[k]!r}: choose another --out, or delete {folder} to run it again")
    return earlier


def eval_main(cfg: EvalConfig) -> dict:
    """eval.py's job: with --suite every task of the suite (run_suite), else the one task asked (evaluate.run_eval)."""
    return run_suite(cfg) if cfg.suite else run_eval(cfg)


def run_suite(cfg: EvalConfig) -> dict:
    """Every task of cfg.suite: the data of those not finished is read (and the settings checked) before the model
    loads, once; each task's evaluation goes to cfg.out/TASK/, then suite.json and suite.md. Returns the suite."""
    given = [k for k in OWN if getattr(cfg, k) is not None]
    if given:
        raise SettingError("EvalConfig", given[0], f"not with suite: each of {cfg.suite}'s tasks has its own")
    names, out = SUITES[cfg.suite], Path(cfg.out)
    model_id, revision = base_for(cfg.adapter, cfg.model, cfg.revision)
    tok, results, todo = load_tokenizer(model_id, revision=revision), {}, []
    positions = model_config(model_id, revision).max_position_embeddings
    for i, name in enumerate(names, 1):
        earlier, task = finished(out / name, cfg), load_task(name)
        if earlier is not None:
            say(cfg, f"[{i}/{len(names)}] {name}: finished earlier ({out / name / 'metrics.json'}), not run again")
            results[name] = earlier
            continue
        mine = dataclasses.replace(cfg, suite=None, task=name, out=str(out / name), mode=mode_of(task))
        todo.append((i, name, *prepare(mine, task, tok, positions)))
    check_writable(out, "--out")   # before the work: results that cannot be written are lost
    if todo:
        model = load_model(model_id, dtype=cfg.dtype, device=cfg.device, revision=revision, quantize=cfg.quantize)
        if cfg.adapter:
            load_adapter(model, cfg.adapter, base=model_id)
        for i, name, mine, task, rows in todo:
            say(cfg, f"[{i}/{len(names)}] {name}: {len(rows):,} validation rows, {cfg.shots}-shot, {mine.mode}")
            t0 = time.time()
            results[name] = evaluate_task(model, tok, mine, (model_id, revision), task, rows, show=False)["metrics"]
            main = results[name]["adapter" if cfg.adapter else "base"]
            say(cfg, f"[{i}/{len(names)}] {name} done in {time.time() - t0:.0f} s: " + ", ".join(
                f"{k} {v:.3f}" for k, v in headline(task, main).items() if k != "n"))
    runs = ["base", "adapter"] if cfg.compare_base else ["adapter" if cfg.adapter else "base"]
    suite = {"suite": cfg.suite, "model": model_id, "revision": revision, "adapter": cfg.adapter, "shots": cfg.shots,
             "limit": cfg.limit,
             **{("tasks" if run == runs[-1] else "base"): {name: headline(load_task(name), results[name][run])
                                                            for name in names} for run in runs},
             "baselines": {name: dict(BASELINES.get(name, [])) for name in names},
             "harness": {name: [{"model": m, "shots": k, **v} for m, k, v in HARNESS.get(name, [])] for name in names}}
    report = format_suite(suite, runs)
    write_json(out / "suite.json", suite)
    write_text(out / "suite.md", report)
    if cfg.log:
        print(report)
    return {"suite": suite, "report": report}


def numbers(name: str, h: dict) -> str:
    """A task's headline as the table writes it."""
    if "likelihood_accuracy" in h and "accuracy" in h:   # a label task: greedy, then likelihood
        return f"{pct(h['accuracy'])} / {pct(h['likelihood_accuracy'])}"
    if "pearson" in h:
        return f"{h['pearson']:.3f} / {h['spearman']:.3f}" + (f" ({h['n_unparsable']} of {h['n']} no number)"
                                                               if h.get("n_unparsable") else "")
    if "accuracy_norm" in h:
        return f"{pct(h['accuracy'])} / {pct(h['accuracy_norm'])}"
    if "likelihood_accuracy" in h:
        return pct(h["likelihood_accuracy"])
    if "exact_match" in h:
        return f"{pct(h['exact_match'])} / {pct(h['char_f1'])}"
    return pct(h["accuracy"])


METRIC = {"marc-ja": "accuracy: greedy / likelihood", "jnli": "accuracy: greedy / likelihood",
          "jsts": "Pearson / Spearman", "jsquad": "exact match / char F1",
          "jcommonsenseqa": "accuracy / accuracy_norm"}


def format_suite(suite: dict, runs: list[str]) -> str:
    """suite.md: one row per task, our numbers beside JGLUE's baselines and the harness's open-calm rows."""
    model = Path(suite["model"].rstrip("/")).name
    names = {"base": f"{model}" + (" before fine-tuning" if suite["adapter"] else ""),
             "adapter": f"{model} + LoRA ({suite['adapter']})"}
    limit = f", the first {suite['limit']} rows of each" if suite["limit"] else ""
    lines = [f"# {suite['suite'].upper()} suite: {suite['model']}" + (f" + {suite['adapter']}" if suite["adapter"]
                                                                      else "") +
             f" ({suite['shots']}-shot, validation splits{limit})", "",
             "| task | rows | metric | " + " | ".join(names[r] for r in runs) +
             " | JGLUE's baselines (dev) | JP harness, open-calm (prompt 0.2) |",
             "|---|---|---|" + "---|" * len(runs) + "---|---|"]
    for name, h in suite["tasks"].items():
        ours = [numbers(name, (suite["base"] if r == "base" and len(runs) > 1 else suite["tasks"])[name])
                for r in runs]
        base = "; ".join(f"{who} {numbers(name, v)}" for who, v in suite["baselines"][name].items()) or "-"
        harness = "; ".join(f"{x['model']} {x['shots']}-shot {numbers(name, x)}" for x in suite["harness"][name]) or \
            "- (no JSTS there)"
        lines.append(f"| {TITLES.get(name, name)} | {h['n']:,} | {METRIC.get(name, '')} | " + " | ".join(ours) +
                     f" | {base} | {harness} |")
    return "\n".join(lines + [
        "", "Our prompts are the post's Alpaca template for every task (minicalm/tasks/task.py); the harness's rows use "
        "its own prompts (0.2) and score label words by their likelihood (beside our second number for MARC-ja and "
        "JNLI). JGLUE's baselines are fine-tuned encoders (and people). JSTS answers are read as numbers by "
        "llm-jp-eval's rule; one that reads as none counts as -2.0. Each task's report is in its folder.", ""])
