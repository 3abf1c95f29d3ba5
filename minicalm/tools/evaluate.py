"""Evaluation: a task's prompt (the post's, on MARC-ja validation, by default) answered greedily and/or scored by
label likelihood; `eval.py`'s job (run_eval) with its report, and training's validation accuracy (evaluate_rows).

Fast at scale: rows are sorted by length and batched; the prefix that every prompt shares is run through the model
once and its keys/values copied into each batch's KV cache, so only the row's own text, the rest of the template
and the answer are computed per example; decoding stops as soon as every row has emitted EOS or a newline. The
decoding is generate.py's.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from ..config import DEVICE, check
from ..generate import decode_n_tokens, left_pad, prefill, score_continuations
from ..io.adapter import base_for, load_adapter
from ..io.files import write_json, write_text
from ..io.tokenizer import Tokenizer, load_tokenizer
from ..io.weights import load_model
from ..lora import lora_disabled
from ..model import eval_mode
from ..tasks import data
from ..tasks.score import INVALID, compute_metrics, parse_answer
from ..tasks.task import MARC_JA, Task, find_task
from .plot import draw_if_possible, plot_confusion

# The post's table (BrainPad, 2023) and two JGLUE baselines (github.com/yahoojapan/JGLUE, MARC-ja dev accuracy):
# accuracy, and the share of answers that are neither label word.
POST_ROWS = [("OpenCALM-7B before fine-tuning (post)", 0.011, 0.985),
             ("OpenCALM-7B + LoRA, 3 epochs (post)", 0.953, 0.0),
             ("Tohoku BERT base (JGLUE baseline)", 0.958, None),
             ("XLM-RoBERTa large (JGLUE baseline)", 0.964, None)]


@torch.inference_mode()
def evaluate_rows(model, tok: Tokenizer, rows: list[data.Row], task: Task = MARC_JA,
                  settings: "EvalConfig | None" = None, **changes) -> dict:
    """Answer every row; returns {"metrics": ..., "predictions": [...]} (metrics per mode when mode='both'). How:
    an EvalConfig's max_len, batch_size, max_new_tokens, mode, share_prefix and log (`settings`, with `changes` made
    to it, e.g. evaluate_rows(model, tok, rows, batch_size=8, log=False)).

    Runs in eval mode (no dropout) and puts the model back in its mode afterwards, also on error.
    """
    cfg = dataclasses.replace(settings or EvalConfig(), **changes)
    enc = data.PromptEncoder(tok, cfg.max_len, task)
    with eval_mode(model):
        answers = Answers(model, tok, enc, cfg.max_new_tokens if cfg.mode != "likelihood" else 0,
                          cfg.mode != "generate")
        P = answers.share_prefix() if cfg.share_prefix else 0
        prompts = [ids[P:] for ids, _ in enc.encode_prompts(rows)]
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
        preds: list[dict] = [{} for _ in rows]
        with tqdm(total=len(rows), desc="eval", disable=not cfg.log, dynamic_ncols=True) as bar:
            for b0 in range(0, len(order), cfg.batch_size):
                batch = order[b0:b0 + cfg.batch_size]
                for i, p in zip(batch, answers([prompts[i] for i in batch])):
                    preds[i] = {"id": rows[i].id, "gold": rows[i].label} | p
                bar.update(len(batch))
    golds, labels, mode = [r.label for r in rows], list(task.labels), cfg.mode
    metrics = {m: compute_metrics(golds, [p[k] for p in preds], labels)
               for m, k in (("generate", "answer"), ("likelihood", "likelihood_answer")) if mode in (m, "both")}
    return {"metrics": metrics[mode] if mode != "both" else metrics, "predictions": preds}


class Answers:
    """A task's answers to batches of prompts: each row's greedy continuation and the label it gives (when
    max_new_tokens > 0), and each label word's log-likelihood (with likelihood)."""

    def __init__(self, model, tok: Tokenizer, enc: data.PromptEncoder, max_new_tokens: int, likelihood: bool):
        self.model, self.tok, self.enc, self.max_new_tokens = model, tok, enc, max_new_tokens
        self.labels = list(enc.task.labels)
        self.choices = [enc.answer_ids[label] for label in self.labels] if likelihood else []
        self.prefix, self.start = None, 0

    def share_prefix(self) -> int:
        """Run the prompts' shared prefix once, into a one-row cache every batch continues from; its length."""
        ids = self.enc.prefix_ids
        if ids:
            device = self.model.gpt_neox.embed_in.weight.device
            _, state = prefill(self.model, torch.tensor([ids], device=device), extra=0)
            self.prefix, self.start = state.cache, len(ids)
        return len(ids)

    def __call__(self, prompts: list[list[int]]) -> list[dict]:
        """The predictions for prompts that continue after the shared prefix (or from the start without one)."""
        tok, device = self.tok, self.model.gpt_neox.embed_in.weight.device
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        extra = max([self.max_new_tokens, *map(len, self.choices)])
        logits, state = prefill(self.model, ids, mask, extra=extra, prefix=self.prefix, start=self.start)
        preds = [{} for _ in prompts]
        if self.choices:
            scores = score_continuations(self.model, logits, state, self.choices)   # (B, N)
            for p, row in zip(preds, scores.tolist()):
                p.update({f"logprob_{lab}": round(s, 5) for lab, s in zip(self.labels, row)})
                p["likelihood_answer"] = self.labels[max(range(len(row)), key=row.__getitem__)]
        if self.max_new_tokens:
            stops, blank = tok.line_end_ids
            new = list(decode_n_tokens(self.model, logits, state, self.max_new_tokens, stop_ids=stops,
                                       leading_ids=blank, pad_id=tok.pad_token_id))
            for r, p in enumerate(preds):
                toks = [int(t[r]) for t in new]
                p["continuation"] = tok.decode(toks[:toks.index(tok.eos_token_id)] if tok.eos_token_id in toks else toks)
                p["answer"] = parse_answer(p["continuation"], self.enc.task.labels)   # a label, or None: invalid
        return preds


# ----------------------------------------------------------------------------- the eval.py job

@dataclass
class EvalConfig:
    model: str | None = None          # hub id or local checkpoint folder; default: the base the --adapter records,
                                      # else cyberagent/open-calm-7b
    revision: str | None = None       # hub branch, tag or commit; default: the one the --adapter records (for its
                                      # base), else main
    adapter: str | None = None        # LoRA adapter folder (PEFT format, e.g. RUN/adapter)
    task: str | None = None           # built-in task (marc-ja, jnli) or a task JSON file; default: the task saved
                                      # beside --adapter (task.json), else marc-ja
    data: str | None = None           # JSON lines of the task's rows; default: its validation split from the hub
    limit: int | None = None          # evaluate only the first N rows
    batch_size: int = 16              # prompts per batch
    max_new_tokens: int = 8           # greedy tokens per answer at most
    max_len: int = 256                # prompt tokens; a longer row's text is cut to fit
    mode: Literal["generate", "likelihood", "both"] = "generate"   # greedy answers, label log-likelihood, or both
    share_prefix: bool = True         # compute the prompts' shared prefix once per run (off: every row in full)
    out: str = "runs/eval"            # folder for metrics.json, predictions.jsonl, report.md
    device: str = DEVICE              # cuda if this torch has it, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"   # the base's (config.resolve_dtype)
    quantize: Literal["nf4"] | None = None   # the base's block weights in 4-bit NF4 (nf4.py)
    compare_base: bool = False        # also evaluate the base model without the adapter, in the same run
    log: bool = True                  # progress bar and the report on the terminal

    def __post_init__(self):
        check(self, {"limit": (self.limit is None or self.limit >= 1, "a positive number of rows"),
                     "batch_size": (self.batch_size >= 1, "at least 1"),
                     "max_new_tokens": (self.max_new_tokens >= 1, "at least 1"),
                     "max_len": (self.max_len >= 2, "at least 2 tokens"),
                     "compare_base": (not self.compare_base or bool(self.adapter),
                                      "used with adapter (it compares the base model with base + adapter)")})


def run_eval(cfg: EvalConfig) -> dict:
    """Load, evaluate, write metrics.json, predictions.jsonl and report.md under cfg.out; returns the results."""
    model_id, revision = base_for(cfg.adapter, cfg.model, cfg.revision)
    task = find_task(cfg.task, cfg.adapter, model_id)
    rows = data.read_jsonl(cfg.data or data.task_data(task, "validation", instead="--data"), task, limit=cfg.limit)
    tok = load_tokenizer(model_id, revision=revision)
    data.PromptEncoder(tok, cfg.max_len, task)   # an ambiguous task or a too short --max-len fails before loading
    model = load_model(model_id, dtype=cfg.dtype, device=cfg.device, revision=revision, quantize=cfg.quantize)
    if cfg.adapter:
        load_adapter(model, cfg.adapter, base=model_id)
    runs: dict[str, dict] = {}
    t0 = time.time()
    if cfg.compare_base:
        with lora_disabled(model):
            runs["base"] = evaluate_rows(model, tok, rows, task, cfg)
    runs["adapter" if cfg.adapter else "base"] = evaluate_rows(model, tok, rows, task, cfg)
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
    tuned = (Path(model_id) / "task.json").is_file()   # merge and full training write the run's task beside it
    names = {"base": f"{model} (fine-tuned checkpoint)" if tuned else f"{model} before fine-tuning",
             "adapter": f"{model} + LoRA ({cfg.adapter})"}
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
