"""Evaluation: a task's prompt (the post's, on MARC-ja validation, by default) answered greedily and/or scored by
label likelihood.

Fast at scale: rows are sorted by length and batched; the head that every prompt shares is run through the model
once and its keys/values copied into each batch's KV cache, so only the row's own text, the rest of the template
and the answer are computed per example; decoding stops as soon as every row has emitted EOS or a newline. Used
by eval.py and by training's periodic validation accuracy.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data
from .generate import LAST, greedy_loop
from .lora import load_adapter, lora_disabled
from .progress import Progress
from .score import INVALID, compute_metrics, parse_answer
from .task import MARC_JA, Task, load_task
from .tokenizer import Tokenizer, load_tokenizer
from .weights import atomic_write, default_dtype, load_model

# The post's table (FACTS.md section 1): accuracy, share of answers that are neither label word.
POST_ROWS = [("OpenCALM-7B before fine-tuning (post)", 0.011, 0.985),
             ("OpenCALM-7B + LoRA, 3 epochs (post)", 0.953, 0.0),
             ("Tohoku BERT base (JGLUE baseline)", 0.958, None),
             ("XLM-RoBERTa large (JGLUE baseline)", 0.964, None)]


@functools.lru_cache(maxsize=4)   # one vocabulary scan per tokenizer, not per validation
def stop_token_ids(tok: Tokenizer) -> tuple[set[int], set[int]]:
    """(stop ids, blank-line ids): EOS and every token whose text holds a newline end the one-line answer;
    whitespace-only newline tokens end it only after it has started (the parser skips leading blank lines)."""
    texts = {i: tok.decode([i], False) for i in range(tok.vocab_size)}
    newline = {i for i, t in texts.items() if "\n" in t}
    return {tok.eos_token_id} | newline, {i for i in newline if not texts[i].strip()}


@torch.inference_mode()
def evaluate_rows(model, tok: Tokenizer, rows: list[data.Row], task: Task = MARC_JA, *, max_len: int = 256,
                  batch_size: int = 16, max_new_tokens: int = 8, mode: str = "generate", reuse_prefix: bool = True,
                  log: bool = True) -> dict:
    """Answer every row; returns {"metrics": ..., "predictions": [...]} (metrics per mode when mode='both').

    Runs in eval mode (no dropout) and puts the model back in its mode afterwards, also on error.
    """
    if mode not in ("generate", "likelihood", "both"):
        raise ValueError(f"mode must be generate, likelihood or both, not {mode!r}")
    was_training = model.training
    model.eval()
    try:
        return _evaluate(model, tok, rows, task, max_len, batch_size, max_new_tokens, mode, reuse_prefix, log)
    finally:
        model.train(was_training)


def _evaluate(model, tok, rows, task, max_len, batch_size, max_new_tokens, mode, reuse_prefix, log) -> dict:
    device = model.gpt_neox.embed_in.weight.device
    enc = data.PromptEncoder(tok, max_len, task)
    P = len(enc.head_ids) if reuse_prefix else 0
    prompts = [ids for ids, _ in enc.encode_prompts(rows)]
    assert all(p[:P] == enc.head_ids[:P] for p in prompts), "segment-wise encoding keeps the shared head intact"
    labels = list(task.labels)
    answers = [enc.answer_ids[label] for label in labels]
    stops, blank = stop_token_ids(tok) if mode != "likelihood" else (set(), set())
    if P:   # the shared head, once for the whole evaluation: (1, nh, P, hs) per layer
        prefix = model.new_cache(1, P)
        model(torch.tensor([enc.head_ids], device=device), cache=prefix, logits_at=LAST.to(device))
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    preds: list[dict] = [{} for _ in rows]
    bar = Progress(len(rows), "eval", enabled=log)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0:b0 + batch_size]
        B, L = len(batch), max(len(prompts[i]) - P for i in batch)
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
        valid = torch.ones(B, P + L + max(max_new_tokens, max(map(len, answers))), dtype=torch.bool)
        for r, i in enumerate(batch):   # left-pad each prompt's own part (after the shared head)
            own = prompts[i][P:]
            ids[r, L - len(own):] = torch.tensor(own)
            valid[r, P:P + L - len(own)] = False
        ids, valid = ids.to(device), valid.to(device)
        positions = P + (valid[:, P:P + L].long().cumsum(-1) - 1).clamp(min=0)      # (B, L)
        cache = model.new_cache(B, valid.shape[1], prefix=prefix if P else None)   # the header's slots first
        logits = model(ids, positions=positions, key_valid=valid[:, :P + L], cache=cache, start=P,
                       logits_at=LAST.to(device))[:, -1]                              # (B, V)
        if mode != "generate":
            scores = label_scores(model, logits, answers, cache, positions[:, -1], valid, P + L)   # (B, N)
        if mode != "likelihood":
            new = greedy_loop(model, logits, cache, positions[:, -1], valid, P + L, max_new_tokens, stops,
                              tok.pad_token_id, blank).tolist()
        for r, i in enumerate(batch):
            p = {"id": rows[i].id, "gold": rows[i].label}
            if mode != "likelihood":
                toks = new[r]
                cut = next((k for k, t in enumerate(toks) if t == tok.eos_token_id), len(toks))
                p["continuation"] = tok.decode(toks[:cut])
                p["answer"] = parse_answer(p["continuation"], task.labels)   # a label, or None: no valid answer
            if mode != "generate":
                p.update({f"logprob_{lab}": round(scores[r, j].item(), 5) for j, lab in enumerate(labels)})
                p["likelihood_answer"] = labels[int(scores[r].argmax())]
            preds[i] = p
        bar.update(B)
    bar.close()
    golds = [r.label for r in rows]
    metrics = {m: compute_metrics(golds, [p[k] for p in preds], labels)
               for m, k in (("generate", "answer"), ("likelihood", "likelihood_answer")) if mode in (m, "both")}
    return {"metrics": metrics[mode] if mode != "both" else metrics, "predictions": preds}


def label_scores(model, logits, answers, cache, last_pos, valid, slot) -> torch.Tensor:
    """Summed log-probability of each answer's tokens after the prompt, continuing from the cache: (B, n_answers)."""
    B = logits.shape[0]
    first = logits.float().log_softmax(-1)                                        # (B, V)
    out = []
    for a in answers:
        score = first[:, a[0]]
        if len(a) > 1:   # feed a[:-1] after the prompt, score a[1:]; later writes overwrite these slots
            feed = torch.tensor(a[:-1], device=logits.device).expand(B, -1)        # (B, k-1)
            pos = last_pos[:, None] + 1 + torch.arange(len(a) - 1, device=logits.device)
            lg = model(feed, positions=pos, key_valid=valid[:, :slot + len(a) - 1], cache=cache, start=slot)
            tgt = torch.tensor(a[1:], device=logits.device).expand(B, -1)[..., None]
            score = score + lg.float().log_softmax(-1).gather(-1, tgt)[..., 0].sum(-1)
        out.append(score)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- the eval.py job

@dataclass
class EvalConfig:
    model: str = "cyberagent/open-calm-7b"
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
    compare_base: bool = False        # evaluate the base model and base + adapter in one run
    log: bool = True


def resolve_task(cfg: EvalConfig) -> Task:
    """--task as given; else the task a training run saved beside its adapter (task.json); else marc-ja."""
    if cfg.task is not None:
        return load_task(cfg.task)
    saved = Path(cfg.adapter) / "task.json" if cfg.adapter else None
    return load_task(saved) if saved is not None and saved.is_file() else MARC_JA


def run_eval(cfg: EvalConfig) -> dict:
    """Load, evaluate, write metrics.json, predictions.jsonl and report.md under cfg.out; returns the results."""
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be a positive number of rows, not {cfg.limit}")
    if cfg.compare_base and not cfg.adapter:
        raise ValueError("--compare-base needs --adapter (it compares the base model with base + adapter)")
    task = resolve_task(cfg)
    rows = data.read_jsonl(cfg.data or data.task_data(task, "validation"), task, limit=cfg.limit)
    tok = load_tokenizer(cfg.model, revision=cfg.revision)
    data.PromptEncoder(tok, cfg.max_len, task)   # an ambiguous task or a too short --max-len fails before loading
    dtype = default_dtype(cfg.device) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = load_model(cfg.model, dtype=dtype, device=cfg.device, revision=cfg.revision)
    if cfg.adapter:
        load_adapter(model, cfg.adapter, name_or_path=cfg.model)
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
    metrics = {"config": asdict(cfg), "task": task.to_dict(), "n_rows": len(rows), "seconds": round(seconds, 2),
               "rows_per_s": round(len(rows) * len(runs) / seconds, 2),
               **{name: r["metrics"] for name, r in runs.items()}}
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, ensure_ascii=False)))
    lines = [json.dumps({"model": name, **p}, ensure_ascii=False) for name, r in runs.items() for p in r["predictions"]]
    atomic_write(out / "predictions.jsonl", lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    pictures = confusion_pictures(runs, list(task.labels), out, cfg.log)
    report = format_report(cfg, task, metrics, runs) + "".join(f"![{name}]({path.name})\n\n"
                                                               for name, path in pictures.items())
    atomic_write(out / "report.md", lambda p: p.write_text(report, encoding="utf-8"))
    if cfg.log:
        print(report)
    return {"metrics": metrics, "runs": runs, "report": report}


def confusion_pictures(runs: dict, labels: list[str], out: Path, log: bool) -> dict[str, Path]:
    """confusion_<run>.png beside report.md for each run's confusion matrix (greedy answers when there are any);
    {title: file}. Without matplotlib (an optional extra) there are no pictures, and one line says so."""
    from .plot import MISSING, plot_confusion
    pictures = {}
    try:
        for name, r in runs.items():
            m = r["metrics"].get("generate", r["metrics"].get("likelihood", r["metrics"]))
            title = f"confusion matrix, {name}"
            pictures[title] = plot_confusion(m["confusion"], labels, out / f"confusion_{name}.png", title)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        if log:
            print(f"eval: no confusion-matrix picture: {MISSING}", file=sys.stderr)
    return pictures


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


def format_report(cfg: EvalConfig, task: Task, metrics: dict, runs: dict) -> str:
    model = Path(cfg.model.rstrip("/")).name   # the title line gives the full path or id
    names = {"base": f"{model} before fine-tuning", "adapter": f"{model} + LoRA ({cfg.adapter})"}
    first = next(iter(runs.values()))["metrics"]
    first = first.get("generate", first.get("likelihood", first))
    post = task.name == MARC_JA.name   # the blog post's own rows belong beside its task only
    lines = [f"# Evaluation of {cfg.model} on {cfg.data or f'{task.name} validation'} ({metrics['n_rows']} rows, "
             f"task {task.name})", ""]
    if cfg.mode != "likelihood":
        lines += [f"Greedy answers to the {'post' if post else 'task'}'s prompt:", "",
                  table([(names[k], r["metrics"]) for k, r in runs.items()], post=post), ""]
        for k, r in runs.items():
            lines += class_tables(f"{names[k]}, greedy answers", r["metrics"].get("generate", r["metrics"]))
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
