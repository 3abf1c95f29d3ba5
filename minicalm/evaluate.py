"""Evaluation: a task's prompt (the post's, on MARC-ja validation, by default) answered greedily and/or scored by
label likelihood.

Fast at scale: rows are sorted by length and batched; the head that every prompt shares is run through the model
once and its keys/values copied into each batch's KV cache, so only the row's own text, the rest of the template
and the answer are computed per example; decoding stops as soon as every row has emitted EOS or a newline. The
decoding itself is generate.py's (`answer`). Used by eval.py and by training's periodic validation accuracy.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data
from .adapter import base_for, load_adapter
from .files import write_json, write_text
from .generate import answer, prefill
from .lora import lora_disabled
from .model import eval_mode
from .plot import draw_if_possible, plot_confusion
from .progress import Progress
from .score import INVALID, compute_metrics, parse_answer
from .task import MARC_JA, Task, find_task
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_model

# The post's table (BrainPad, 2023) and two JGLUE baselines (github.com/yahoojapan/JGLUE, MARC-ja dev accuracy):
# accuracy, and the share of answers that are neither label word.
POST_ROWS = [("OpenCALM-7B before fine-tuning (post)", 0.011, 0.985),
             ("OpenCALM-7B + LoRA, 3 epochs (post)", 0.953, 0.0),
             ("Tohoku BERT base (JGLUE baseline)", 0.958, None),
             ("XLM-RoBERTa large (JGLUE baseline)", 0.964, None)]


@torch.inference_mode()
def evaluate_rows(model, tok: Tokenizer, rows: list[data.Row], task: Task = MARC_JA, *, max_len: int = 256,
                  batch_size: int = 16, max_new_tokens: int = 8, mode: str = "generate", reuse_prefix: bool = True,
                  log: bool = True) -> dict:
    """Answer every row; returns {"metrics": ..., "predictions": [...]} (metrics per mode when mode='both').

    Runs in eval mode (no dropout) and puts the model back in its mode afterwards, also on error.
    """
    if mode not in ("generate", "likelihood", "both"):
        raise ValueError(f"mode must be generate, likelihood or both, not {mode!r}")
    with eval_mode(model):
        preds = answer_rows(model, tok, rows, task, max_len, batch_size, max_new_tokens if mode != "likelihood" else 0,
                            mode != "generate", reuse_prefix, log)
    golds, labels = [r.label for r in rows], list(task.labels)
    metrics = {m: compute_metrics(golds, [p[k] for p in preds], labels)
               for m, k in (("generate", "answer"), ("likelihood", "likelihood_answer")) if mode in (m, "both")}
    return {"metrics": metrics[mode] if mode != "both" else metrics, "predictions": preds}


def answer_rows(model, tok: Tokenizer, rows: list[data.Row], task: Task, max_len: int, batch_size: int,
                max_new_tokens: int, likelihood: bool, reuse_prefix: bool, log: bool) -> list[dict]:
    """Each row's prediction: its greedy continuation and answer (max_new_tokens > 0) and its label likelihoods."""
    enc = data.PromptEncoder(tok, max_len, task)
    prompts = [ids for ids, _ in enc.encode_prompts(rows)]
    P = len(enc.head_ids) if reuse_prefix else 0
    assert all(p[:P] == enc.head_ids[:P] for p in prompts), "segment-wise encoding keeps the shared head intact"
    head, device = None, model.gpt_neox.embed_in.weight.device
    if P:   # the shared head, once for the whole evaluation: (1, nh, P, hs) per layer
        head = model.new_cache(1, P)
        prefill(model, torch.tensor([enc.head_ids], device=device), head, torch.arange(P, device=device)[None], None)
    labels = list(task.labels)
    stops, blank = tok.line_end_ids
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    preds: list[dict] = [{} for _ in rows]
    bar = Progress(len(rows), "eval", enabled=log)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0:b0 + batch_size]
        new, scores = answer(model, [prompts[i][P:] for i in batch], tok.pad_token_id, head=head, start=P,
                             max_new_tokens=max_new_tokens, stop_ids=stops, leading_ids=blank,
                             choices=[enc.answer_ids[label] for label in labels] if likelihood else None)
        for r, i in enumerate(batch):
            p = preds[i] = {"id": rows[i].id, "gold": rows[i].label}
            if new is not None:
                toks = new[r].tolist()
                cut = toks.index(tok.eos_token_id) if tok.eos_token_id in toks else len(toks)
                p["continuation"] = tok.decode(toks[:cut])
                p["answer"] = parse_answer(p["continuation"], task.labels)   # a label, or None: no valid answer
            if scores is not None:
                p.update({f"logprob_{lab}": round(scores[r, j].item(), 5) for j, lab in enumerate(labels)})
                p["likelihood_answer"] = labels[int(scores[r].argmax())]
        bar.update(len(batch))
    bar.close()
    return preds


# ----------------------------------------------------------------------------- the eval.py job

@dataclass
class EvalConfig:
    model: str | None = None          # hub id or folder; None: the adapter's base (at its revision), else POST_MODEL
    revision: str | None = None
    adapter: str | None = None        # PEFT-format LoRA adapter folder
    task: str | None = None           # built-in name or task file; None: the adapter's (task.json) or marc-ja
    data: str | None = None           # JSON-lines file; None: the task's validation split from the hub
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    max_len: int = 256
    mode: str = "generate"            # generate | likelihood | both
    out: str = "runs/eval"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "auto"
    quantize: str | None = None       # "nf4": the base's block weights in 4 bits (nf4.py)
    compare_base: bool = False        # evaluate the base model and base + adapter in one run
    log: bool = True


def run_eval(cfg: EvalConfig) -> dict:
    """Load, evaluate, write metrics.json, predictions.jsonl and report.md under cfg.out; returns the results."""
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be a positive number of rows, not {cfg.limit}")
    if cfg.compare_base and not cfg.adapter:
        raise ValueError("--compare-base needs --adapter (it compares the base model with base + adapter)")
    model_id, revision = base_for(cfg.adapter, cfg.model, cfg.revision)
    task = find_task(cfg.task, cfg.adapter, model_id)
    rows = data.read_jsonl(cfg.data or data.task_data(task, "validation", instead="--data"), task, limit=cfg.limit)
    tok = load_tokenizer(model_id, revision=revision)
    data.PromptEncoder(tok, cfg.max_len, task)   # an ambiguous task or a too short --max-len fails before loading
    model = load_model(model_id, dtype=cfg.dtype, device=cfg.device, revision=revision, quantize=cfg.quantize)
    if cfg.adapter:
        load_adapter(model, cfg.adapter, base=model_id)
    kw = dict(max_len=cfg.max_len, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, mode=cfg.mode,
              log=cfg.log)
    runs: dict[str, dict] = {}
    t0 = time.time()
    if cfg.compare_base:
        with lora_disabled(model):
            runs["base"] = evaluate_rows(model, tok, rows, task, **kw)
    runs["adapter" if cfg.adapter else "base"] = evaluate_rows(model, tok, rows, task, **kw)
    seconds = time.time() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"config": asdict(cfg), "model": model_id, "revision": revision, "task": task.to_dict(),
               "n_rows": len(rows), "seconds": round(seconds, 2),
               "rows_per_s": round(len(rows) * len(runs) / seconds, 2),
               **{name: r["metrics"] for name, r in runs.items()}}
    write_json(out / "metrics.json", metrics)
    write_text(out / "predictions.jsonl", "".join(json.dumps({"model": name, **p}, ensure_ascii=False) + "\n"
                                                  for name, r in runs.items() for p in r["predictions"]))
    pictures = {}   # each run's confusion matrix, of its greedy answers when there are any
    for name, r in runs.items():
        title = f"confusion matrix, {name}"
        for path in draw_if_possible(plot_confusion, first_mode(r["metrics"])["confusion"], list(task.labels),
                                     out / f"confusion_{name}.png", title, prog="eval"):
            pictures[title] = path
    report = format_report(cfg, model_id, task, metrics, runs) + "".join(f"![{title}]({path.name})\n\n"
                                                                         for title, path in pictures.items())
    write_text(out / "report.md", report)
    if cfg.log:
        print(report)
    return {"metrics": metrics, "runs": runs, "report": report}


def first_mode(m: dict) -> dict:
    """The greedy answers' metrics of a run (or its likelihood metrics when it has no greedy answers)."""
    return m.get("generate", m.get("likelihood", m))


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[tuple[str, dict]], post: bool = True) -> str:
    """The post's table: accuracy and no-valid-answer share, our extra columns, then the post's own rows."""
    out = ["| model | accuracy | no valid answer | accuracy of valid answers | balanced accuracy | macro-F1 |",
           "|---|---|---|---|---|---|"]
    for name, m in rows:
        m = m.get("generate", m)
        out.append(f"| {name} | {pct(m['accuracy'])} | {pct(m['invalid_rate'])} | {pct(m['valid_accuracy'])} | "
                   f"{pct(m['balanced_accuracy'])} | {m['macro_f1']:.3f} |")
    for name, acc, inv in POST_ROWS if post else ():
        out.append(f"| {name} | {pct(acc)} | {pct(inv)} | | | |")
    return "\n".join(out)


def class_tables(name: str, m: dict) -> list[str]:
    """Per-class precision / recall / F1 and the confusion matrix (gold rows, answer columns, invalid last)."""
    labels = list(m["per_class"])
    lines = [f"{name}:", "", "| gold \\ answer | " + " | ".join(labels) + " | invalid | recall | precision | F1 |",
             "|---" * (len(labels) + 5) + "|"]
    for g in labels:
        c, pc = m["confusion"][g], m["per_class"][g]
        lines.append(f"| {g} | " + " | ".join(str(c[p]) for p in [*labels, INVALID]) +
                     f" | {pct(pc['recall'])} | {pct(pc['precision'])} | {pc['f1']:.3f} |")
    return lines + [""]


def format_report(cfg: EvalConfig, model_id: str, task: Task, metrics: dict, runs: dict) -> str:
    model = Path(model_id.rstrip("/")).name   # the title line gives the full path or id
    names = {"base": f"{model} before fine-tuning", "adapter": f"{model} + LoRA ({cfg.adapter})"}
    first = first_mode(next(iter(runs.values()))["metrics"])
    post = task.name == MARC_JA.name   # the blog post's own rows belong beside its task only
    revision = f" (revision {metrics['revision']})" if metrics["revision"] else ""
    lines = [f"# Evaluation of {model_id}{revision} on {cfg.data or f'{task.name} validation'} "
             f"({metrics['n_rows']} rows, task {task.name})", ""]
    if cfg.mode != "likelihood":
        lines += [f"Greedy answers to the {'post' if post else 'task'}'s prompt:", "",
                  table([(names[k], r["metrics"]) for k, r in runs.items()], post=post), ""]
        for k, r in runs.items():
            lines += class_tables(f"{names[k]}, greedy answers", first_mode(r["metrics"]))
    if cfg.mode != "generate":
        lines += ["Label likelihood (sum of the label word's log-probabilities; never invalid):", ""]
        for k, r in runs.items():
            m = r["metrics"].get("likelihood", r["metrics"])
            lines.append(f"- {names[k]}: accuracy {pct(m['accuracy'])}, balanced accuracy {pct(m['balanced_accuracy'])}"
                         f", macro-F1 {m['macro_f1']:.3f}")
        lines.append("")
    lo, hi = first["accuracy_ci95"]
    lines += [f"Majority class ({first['majority_label']}): {pct(first['majority_baseline'])}. 95% interval of the "
              f"first row's accuracy: {pct(lo)} to {pct(hi)}. {metrics['rows_per_s']} rows/s, "
              f"{metrics['seconds']} s.", ""]
    return "\n".join(lines)
