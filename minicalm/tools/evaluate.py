"""Evaluation: a task's prompt (the post's, on MARC-ja validation, by default) answered greedily and/or scored by
label likelihood, a multiple-choice task by every choice's likelihood; `eval.py`'s job (run_eval) with its report, and
training's validation accuracy (evaluate_rows). A suite of tasks (`--suite jglue`) is tools/suite.py's.

Fast at scale: rows are sorted by length and batched; the prefix that every prompt shares is run through the model
once and its keys/values copied into each batch's KV cache, so only the row's own text, the rest of the template
and the answer are computed per example; decoding stops as soon as every row has emitted EOS or a newline. The
decoding is generate.py's.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from ..config import DEVICE, Dtype, SettingError, check_choices, check_positions, refuse
from ..generate import Decoding, decode_n_tokens, left_pad, prefill, score_continuations
from ..io.adapter import base_for, load_adapter
from ..io.files import check_writable, write_json, write_text
from ..io.tokenizer import Tokenizer, load_tokenizer
from ..io.weights import load_model, model_config
from ..lora import lora_disabled
from ..loss import shared_prefix_len, validation_loss
from ..model import eval_mode
from ..tasks import data
from ..tasks.score import (INVALID, UNPARSABLE, choice_answer, choice_metrics, compute_metrics, free_answer,
                           generated_choice_metrics, parse_answer, text_metrics)
from ..tasks.task import LLM_JP_EVAL_METRICS, MARC_JA, NUMERIC, Task, find_task
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
    to it, e.g. evaluate_rows(model, tok, rows, batch_size=8, log=False)). A free-form task's answers are scored by
    exact match and character F1 against each row's references (and the task's metrics), beside the answers' loss;
    a multiple-choice task's by every choice's log-likelihood (accuracy, and per character: accuracy_norm) and/or
    its greedy answer matched to the choices.

    Runs in eval mode (no dropout) and puts the model back in its mode afterwards, also on error.
    """
    positions = model.config.max_position_embeddings
    cfg = settled(dataclasses.replace(settings or EvalConfig(), **changes), task, positions)
    enc, mode = data.PromptEncoder(tok, cfg.max_len, task), cfg.mode
    choices = enc.choice_ids(rows) if task.multiple_choice else None
    with eval_mode(model):
        budget = 0 if mode == "likelihood" else cfg.max_new_tokens or task.answer_budget
        if choices and mode != "likelihood" and not cfg.max_new_tokens:   # the longest choice and the line's end
            budget = max(len(c) for cs in choices for c in cs) + 1
        answers = Answers(model, tok, enc, budget, mode != "generate" and not task.free_form)
        encoded, cut = zip(*enc.encode_prompts(rows))
        # a free-form answer takes its whole budget; a label word or choice and EOS the room max_len leaves after it
        need = max(len(ids) + (budget if task.free_form else reserve or enc.reserve)
                   for ids, reserve in zip(encoded, enc.row_reserves(rows)))
        check_positions(model.config, need, ("EvalConfig", "max_len"), "the longest prompt plus the answer",
                        "lower it (or --max-new-tokens)")
        if cfg.log and any(cut):
            print(f"eval: {sum(cut)} of {len(rows)} rows cut to fit --max-len {cfg.max_len}", file=sys.stderr)
        P = answers.share_prefix(encoded[0][:shared_prefix_len(encoded)]) if cfg.share_prefix else 0
        prompts = [ids[P:] for ids in encoded]
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
        preds: list[dict] = [{} for _ in rows]
        with tqdm(total=len(rows), desc=task.name, disable=not cfg.log, dynamic_ncols=True) as bar:
            for b0 in range(0, len(order), cfg.batch_size):
                batch = order[b0:b0 + cfg.batch_size]
                asked = [rows[i].choices for i in batch] if choices else None
                for i, p in zip(batch, answers([prompts[i] for i in batch], asked)):
                    gold = list(rows[i].references) if task.free_form else rows[i].gold if choices else rows[i].label
                    preds[i] = {"id": rows[i].id, "gold": gold} | p
                bar.update(len(batch))
    if task.free_form:
        examples, device = data.encode_rows(enc, rows)[0], model.gpt_neox.embed_in.weight.device
        batches = data.loss_batches(examples, cfg.batch_size, tok.pad_token_id, device)
        loss = validation_loss(model, batches, cfg.share_prefix) if examples else None
        metrics = text_metrics([p["gold"] for p in preds], [p["answer"] for p in preds], task.metrics or ())
        if task.llm_jp_eval_metrics:   # again under the file's own names (its char_f1 is our token_sort_ratio)
            metrics["llm_jp_eval"] = {m: metrics[LLM_JP_EVAL_METRICS[m]] for m in task.llm_jp_eval_metrics}
        return {"metrics": metrics | {"answer_loss": loss}, "predictions": preds}
    if choices:
        return choice_results(rows, preds, mode)
    golds, labels = [r.label for r in rows], list(task.labels)
    metrics = {m: compute_metrics(golds, [p[k] for p in preds], labels)
               for m, k in (("generate", "answer"), ("likelihood", "likelihood_answer")) if mode in (m, "both")}
    return {"metrics": metrics[mode] if mode != "both" else metrics, "predictions": preds}


def argmax(xs: list[float]) -> int:
    """The index of the largest (the first of equals, as numpy's argmax)."""
    return max(range(len(xs)), key=xs.__getitem__)


def settled(cfg: "EvalConfig", task: Task, positions: int) -> "EvalConfig":
    """cfg with its defaults made concrete for a task: the mode (a multiple-choice task's likelihood, else greedy
    answers) and max_len, what fits: the model's positions, less a free-form answer's budget (it comes on top of the
    prompt; a label word's or choice's room is within max_len). A run's recorded max_len is no limit here."""
    mode = cfg.mode or ("likelihood" if task.multiple_choice else "generate")
    budget = (cfg.max_new_tokens or task.answer_budget) if task.free_form else 0
    return dataclasses.replace(cfg, mode=mode, max_len=cfg.max_len or max(2, positions - budget))


def choice_results(rows: list[data.Row], preds: list[dict], mode: str) -> dict:
    """A multiple-choice task's metrics: likelihood (accuracy, accuracy_norm) and/or greedy answers matched to the
    choices; the predictions' "answer" is the likelihood's pick (the greedy one's under generate mode alone)."""
    golds, n = [r.gold for r in rows], [len(r.choices) for r in rows]
    metrics = {}
    if mode != "generate":
        metrics["likelihood"] = choice_metrics(golds, [p["answer"] for p in preds], [p["answer_norm"] for p in preds],
                                               n)
    if mode != "likelihood":
        metrics["generate"] = generated_choice_metrics(golds, [p["generated_answer"] for p in preds], n)
    if mode == "generate":
        for p in preds:
            p["answer"] = p.pop("generated_answer")
    return {"metrics": metrics[mode] if mode != "both" else metrics, "predictions": preds}


def score_choices(model, logits: torch.Tensor, state: Decoding, choices: list[list[list[int]]]) -> list[list[float]]:
    """Summed log-probability (fp32) of each row's choices after its prompt (prefill's logits (B, V) and state): one
    list per row, as the JP LM evaluation harness scores a multiple-choice question.

    The prompt ran once; its choices then run together, one batch on its keys and values: the cache's prompt slots
    are copied once per choice (M = all the batch's choices), and every choice's tokens but its last are fed at the
    same free slots, right-padded (a padding token comes after a choice's own, so causal attention keeps them out).
    score_continuations' way, one forward per choice over the rows' shared prompt, does the same work in more passes
    (bench.py times both against transformers' prompt-plus-choice per sequence)."""
    device = logits.device
    rows = torch.tensor([r for r, cs in enumerate(choices) for _ in cs], device=device)      # (M,) each one's row
    flat = [c for cs in choices for c in cs]
    M, K = len(flat), max(map(len, flat)) - 1
    first = torch.tensor([c[0] for c in flat], device=device)
    score = logits.float().log_softmax(-1)[rows].gather(1, first[:, None])[:, 0]              # (M,)
    if K > 0:   # feed c[:-1] after the prompt, score c[1:]
        pad = lambda c: c + [0] * (K + 1 - len(c))   # noqa: E731
        feed = torch.tensor([pad(c)[:-1] for c in flat], device=device)                       # (M, K)
        target = torch.tensor([pad(c)[1:] for c in flat], device=device)                      # (M, K)
        real = torch.arange(K, device=device)[None] < torch.tensor([len(c) - 1 for c in flat], device=device)[:, None]
        valid, slot, n = state.cache.key_valid, state.slot, {len(cs) for cs in choices}
        cache = model.new_cache(M, slot + K, None if valid is None else torch.cat(
            (valid[rows, :slot], torch.ones(M, K, dtype=torch.bool, device=device)), dim=1))
        for mine, theirs in zip(cache.layers, state.cache.layers):
            for new, old in ((mine.k, theirs.k), (mine.v, theirs.v)):                           # (M, nh, S, hs)
                if len(n) == 1:   # N choices per row: one broadcast copy of the row's slots, no gathered temporary
                    new.view(len(choices), *n, *new.shape[1:])[:, :, :, :slot] = old[:, None, :, :slot]
                else:
                    new[:, :, :slot] = old[rows, :, :slot]
        pos = state.positions[rows][:, None] + 1 + torch.arange(K, device=device)             # (M, K)
        lg = model(feed, pos, start=state.slot, cache=cache, logits_at=real)                  # (N, V) real tokens
        picked = lg.float().log_softmax(-1).gather(1, target[real][:, None])[:, 0]            # (N,)
        score = score.index_add(0, torch.nonzero(real)[:, 0], picked)
    per_row, i = [], 0
    for cs in choices:
        per_row.append(score[i:i + len(cs)].tolist())
        i += len(cs)
    return per_row


class Answers:
    """A task's answers to batches of prompts: each row's greedy continuation and the label it gives, or the free-form
    answer it writes (when max_new_tokens > 0), and each label word's log-likelihood (with likelihood)."""

    def __init__(self, model, tok: Tokenizer, enc: data.PromptEncoder, max_new_tokens: int, likelihood: bool):
        self.model, self.tok, self.enc, self.max_new_tokens = model, tok, enc, max_new_tokens
        self.task = task = enc.task
        self.labels, self.likelihood = list(task.labels or {}), likelihood
        self.choices = [enc.answer_ids[label] for label in self.labels] if likelihood else []
        self.prefix, self.start = None, 0
        # where a row stops: a label word ends at its line's end (leading blank lines skipped); a free-form answer at
        # EOS or at a token holding one of its stop strings (a stop string spread over tokens: the text check below)
        self.stops, self.leading = tok.line_end_ids if not task.free_form else (
            {tok.eos_token_id} | tok.ids_holding(task.stop or []), set())

    def share_prefix(self, ids: list[int]) -> int:
        """Run the prompts' shared prefix (the ids all begin with: loss.shared_prefix_len's rule) once, into a one-row
        cache every batch continues from; its length."""
        if ids:
            device = self.model.gpt_neox.embed_in.weight.device
            _, state = prefill(self.model, torch.tensor([ids], device=device), extra=0)
            self.prefix, self.start = state.cache, len(ids)
        return len(ids)

    def __call__(self, prompts: list[list[int]], choices: list[tuple[str, ...]] | None = None) -> list[dict]:
        """The predictions for prompts that continue after the shared prefix (or from the start without one); for a
        multiple-choice task `choices` (each row's): with likelihood every choice's log-likelihood and the choice it
        picks (per character of the choice too), and the greedy answer matched to one."""
        tok, device = self.tok, self.model.gpt_neox.embed_in.weight.device
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        extra = max([self.max_new_tokens, *map(len, self.choices)])
        logits, state = prefill(self.model, ids, mask, extra=extra, prefix=self.prefix, start=self.start)
        preds = [{} for _ in prompts]
        if self.choices:
            scores = score_continuations(self.model, logits, state, self.choices)   # (B, N)
            for p, row in zip(preds, scores.tolist()):
                p.update({f"logprob_{lab}": round(s, 5) for lab, s in zip(self.labels, row)})
                p["likelihood_answer"] = self.labels[argmax(row)]
        if choices is not None and self.likelihood:   # the harness's acc, and acc_norm: per character of the choice
            ids = [self.tok.encode_batch(list(cs)) for cs in choices]
            for p, texts, row in zip(preds, choices, score_choices(self.model, logits, state, ids)):
                per_char = [s / len(t) for s, t in zip(row, texts)]
                p.update({"answer": argmax(row), "answer_norm": argmax(per_char),
                          "logprobs": [round(s, 5) for s in row]})
        if self.max_new_tokens:
            new: list[torch.Tensor] = []
            for token in decode_n_tokens(self.model, logits, state, self.max_new_tokens, stop_ids=self.stops,
                                         leading_ids=self.leading, pad_id=tok.pad_token_id):
                new.append(token)
                if self.task.stop and all(map(self.done, torch.stack(new, 1).tolist())):
                    break   # every row wrote EOS or a stop string: no more steps
            for r, (p, text) in enumerate(zip(preds, map(self.text, torch.stack(new, 1).tolist()))):
                p["continuation"] = text
                if self.task.free_form:
                    p["answer"] = free_answer(text, self.task.stop)
                elif self.task.multiple_choice:
                    p["generated_answer"] = choice_answer(text, choices[r])
                else:
                    p["answer"] = parse_answer(text, self.task.labels)   # a label, or None: invalid
        return preds

    def text(self, tokens: list[int]) -> str:
        """A row's continuation, up to its EOS."""
        eos = self.tok.eos_token_id
        return self.tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)

    def done(self, tokens: list[int]) -> bool:
        """Whether a row has stopped: a stop token, or a stop string spread over several tokens."""
        return any(t in self.stops for t in tokens) or any(s in self.text(tokens) for s in self.task.stop)


# ----------------------------------------------------------------------------- the eval.py job

@dataclass
class EvalConfig:
    model: str | None = None          # hub id or local checkpoint folder; default: the base the --adapter records,
                                      # else cyberagent/open-calm-7b
    revision: str | None = None       # hub branch, tag or commit; default: the one the --adapter records (for its
                                      # base), else main
    adapter: str | None = None        # LoRA adapter folder (PEFT format, e.g. RUN/adapter)
    task: str | None = None           # built-in task (marc-ja, jnli, alpaca, jsquad, jsts, jcommonsenseqa), a task
                                      # JSON file or an llm-jp-eval file (its samples are the rows); default: the
                                      # task saved beside --adapter (task.json), else marc-ja
    suite: Literal["jglue"] | None = None   # run every task of a suite on its validation split, the model loaded
                                      # once (jglue: MARC-ja, JSTS, JNLI, JSQuAD, JCommonsenseQA): --out gets
                                      # suite.json, suite.md and each task's report in a subfolder; an interrupted
                                      # suite resumes at the task it stopped in
    data: str | None = None           # JSON lines (or a JSON array) of the task's rows; default: the task file's
                                      # samples, else its validation split from the hub
    limit: int | None = None          # evaluate only the first N rows
    batch_size: int = 16              # prompts per batch
    max_new_tokens: int | None = None   # greedy tokens per answer at most; default: 8 for a label word, the
                                      # longest choice and one, the task's max_new_tokens for a free-form answer
    max_len: int | None = None        # prompt tokens (with a label word or choice and eos); default: what fits,
                                      # the model's positions less a free-form answer's budget; a longer row's text
                                      # is cut to fit (said in one line)
    mode: Literal["generate", "likelihood", "both"] | None = None   # greedy answers, the log-likelihood of the
                                      # label words or choices, or both; default: likelihood for a multiple-choice
                                      # task, else generate
    share_prefix: bool = True         # compute the prompts' shared prefix once per run (off: every row in full)
    out: str = "runs/eval"            # folder for metrics.json, predictions.jsonl, report.md
    device: str = DEVICE              # cuda if this torch has it, else cpu
    dtype: Dtype = "auto"                    # the base's (config.resolve_dtype)
    quantize: Literal["nf4"] | None = None   # the base's block weights in 4-bit NF4 (nf4.py)
    shots: int = 0                    # k-shot: solved examples before each question, in the task's template
    shots_file: str | None = None     # JSON lines to draw the shots from; default: the task file's few_shots, else
                                      # the task's training split
    seed: int = 0                     # which shots are drawn
    compare_base: bool = False        # also evaluate the base model without the adapter, in the same run
    log: bool = True                  # progress bar and the report on the terminal

    def __post_init__(self):
        check_choices(self)
        if self.limit is not None and self.limit < 1:
            raise refuse(self, "limit", "a positive number of rows")
        if self.batch_size < 1:
            raise refuse(self, "batch_size", "at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise refuse(self, "max_new_tokens", "at least 1")
        if self.shots < 0:
            raise refuse(self, "shots", ">= 0")
        if self.max_len is not None and self.max_len < 2:
            raise refuse(self, "max_len", "at least 2 tokens")
        if self.compare_base and not self.adapter:
            raise refuse(self, "compare_base", "used with adapter (it compares the base model with base + adapter)")


def run_eval(cfg: EvalConfig) -> dict:
    """Load, evaluate, write metrics.json, predictions.jsonl and report.md under cfg.out; returns the results. With
    cfg.suite, every task of the suite (tools/suite.py)."""
    if cfg.suite:
        raise SettingError("EvalConfig", "suite", "run_eval evaluates one task; a suite is tools.suite.run_suite's")
    model_id, revision = base_for(cfg.adapter, cfg.model, cfg.revision)
    task = find_task(cfg.task, cfg.adapter, model_id)
    tok = load_tokenizer(model_id, revision=revision)
    cfg, task, rows = prepare(cfg, task, tok, model_config(model_id, revision).max_position_embeddings)
    check_writable(cfg.out, "--out")   # before the work: results that cannot be written are lost
    model = load_model(model_id, dtype=cfg.dtype, device=cfg.device, revision=revision, quantize=cfg.quantize)
    if cfg.adapter:
        load_adapter(model, cfg.adapter, base=model_id)
    return evaluate_task(model, tok, cfg, (model_id, revision), task, rows)


def prepare(cfg: EvalConfig, task: Task, tok: Tokenizer, positions: int) -> tuple[EvalConfig, Task, list[data.Row]]:
    """What is settled before a model loads: the settings made concrete for the task (settled), the mode it can be
    scored by, its rows (the file given, the task file's, else its validation split) and shots, and that its prompts
    can be encoded within max_len (an ambiguous task or a too short --max-len fails here)."""
    cfg = settled(cfg, task, positions)
    if task.free_form and cfg.mode != "generate":
        raise SettingError("EvalConfig", "mode", f"task {task.name} has free-form answers, scored by generating them "
                                                 f"(exact match, char F1); likelihood needs label words or choices")
    rows = data.rows_of(data.split_rows(task, "validation", cfg.data, "--data"), task, cfg.limit)
    if cfg.shots:
        task = task.with_shots(draw_shots(cfg, task, rows))
    data.PromptEncoder(tok, cfg.max_len, task)
    return cfg, task, rows


def evaluate_task(model, tok: Tokenizer, cfg: EvalConfig, base: tuple[str, str | None], task: Task,
                  rows: list[data.Row], show: bool = True) -> dict:
    """Evaluate the loaded model (and the base without its adapter, with compare_base) on the rows, and write
    predictions.jsonl, the pictures, report.md and, last, metrics.json under cfg.out, each atomically: a folder
    with metrics.json holds a finished evaluation. Prints the report with cfg.log and show. Returns the results."""
    model_id, revision = base
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
               "n_rows": len(rows), "shots": cfg.shots, "seconds": round(seconds, 2),
               "rows_per_s": round(len(rows) * len(runs) / seconds, 2),
               **{name: r["metrics"] for name, r in runs.items()}}
    (out / "metrics.json").unlink(missing_ok=True)   # an earlier evaluation's, which the files below replace
    write_text(out / "predictions.jsonl", "".join(json.dumps({"model": name, **p}, ensure_ascii=False) + "\n"
                                                  for name, r in runs.items() for p in r["predictions"]))
    pictures = {}   # each run's confusion matrix, of its greedy answers when there are any
    for name, r in runs.items() if task.labels else ():
        title = f"confusion matrix, {name}"
        for path in draw_if_possible(plot_confusion, first_mode(r["metrics"])["confusion"], list(task.labels),
                                     out / f"confusion_{name}.png", title, prog="eval"):
            pictures[title] = path
    report = format_report(cfg, model_id, task, metrics, runs) + "".join(f"![{title}]({path.name})\n\n"
                                                                         for title, path in pictures.items())
    write_text(out / "report.md", report)
    write_json(out / "metrics.json", metrics)   # last: a folder with metrics.json holds a whole evaluation
    if cfg.log and show:
        print(report)
    return {"metrics": metrics, "runs": runs, "report": report}


def draw_shots(cfg: EvalConfig, task: Task, asked: list[data.Row]) -> list[data.Row]:
    """cfg.shots solved rows, drawn with cfg.seed from --shots-file, the task file's few_shots or the task's training
    split; never a row being asked (same text)."""
    if cfg.shots_file or not task.few_shots:
        source = data.split_rows(dataclasses.replace(task, samples=None), "train", cfg.shots_file, "--shots-file")
        where = cfg.shots_file or f"task {task.name}'s training split"
    else:
        source, where = data.parse_rows(task.few_shots, task, f"{task.source}: few_shots"), f"{task.source}'s few_shots"
    seen = {tuple(r.fields.values()) for r in asked}
    pool = [r for r in data.rows_of(source, task) if tuple(r.fields.values()) not in seen]
    if cfg.shots > len(pool):
        raise SettingError("EvalConfig", "shots", f"{cfg.shots} shots asked, {len(pool)} examples available in "
                                                  f"{where} (rows being asked excluded)")
    return random.Random(cfg.seed).sample(pool, cfg.shots)


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
    tuned = (Path(model_id) / "task.json").is_file()   # merging and full fine-tuning write the task beside it
    shots = f", {cfg.shots}-shot" if cfg.shots else ""
    names = {"base": (f"{model} (fine-tuned checkpoint)" if tuned else f"{model} before fine-tuning") + shots,
             "adapter": f"{model} + LoRA ({cfg.adapter}){shots}"}
    revision = f" (revision {metrics['revision']})" if metrics["revision"] else ""
    lines = [f"# Evaluation of {model_id}{revision} on {cfg.data or f'{task.name} validation'} "
             f"({metrics['n_rows']} rows, task {task.name}{shots})", ""]
    if task.free_form:
        return "\n".join(lines + free_form_report(cfg, task, runs, names, metrics))
    if task.multiple_choice:
        return "\n".join(lines + choice_report(cfg, runs, names, metrics))
    first = first_mode(next(iter(runs.values()))["metrics"])
    post = task.name == MARC_JA.name and not cfg.shots   # the blog post's own rows belong beside its zero-shot task
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


def choice_report(cfg: EvalConfig, runs: dict, names: dict, metrics: dict) -> list[str]:
    """A multiple-choice task's tables: the choices' likelihood (accuracy and per character) and/or greedy answers."""
    out = []
    if cfg.mode != "generate":
        out += ["Each choice scored by its log-likelihood after the prompt; accuracy_norm divides it by the choice's "
                "length in characters (the JP LM evaluation harness's acc and acc_norm):", "",
                "| model | accuracy | accuracy_norm | 95% interval of accuracy |", "|---|---|---|---|"]
        for k, r in runs.items():
            m = r["metrics"].get("likelihood", r["metrics"])
            lo, hi = m["accuracy_ci95"]
            out.append(f"| {names[k]} | {pct(m['accuracy'])} | {pct(m['accuracy_norm'])} | {pct(lo)} to {pct(hi)} |")
        out.append("")
    if cfg.mode != "likelihood":
        out += ["Greedy answers, the first line matched to a choice after NFKC (else no valid answer):", "",
                "| model | accuracy | no valid answer | accuracy of valid answers |", "|---|---|---|---|"]
        for k, r in runs.items():
            m = r["metrics"].get("generate", r["metrics"])
            out.append(f"| {names[k]} | {pct(m['accuracy'])} | {pct(m['invalid_rate'])} | {pct(m['valid_accuracy'])} |")
        out.append("")
    chance = first_mode(next(iter(runs.values()))["metrics"])["chance"]
    return out + [f"Chance: {pct(chance)}. {metrics['rows_per_s']} rows/s, {metrics['seconds']} s.", ""]


def metric_columns(task: Task) -> list[str]:
    """The free-form report's columns for the task's metrics besides exact match and char F1."""
    named = [m for m in task.metrics or () if m not in ("exact_match", "char_f1")]
    return named + ["n_unparsable"] * any(m in NUMERIC for m in named)


def cell(name: str, m: dict) -> str:
    """A metric as the report writes it: correlations to 3 decimals, counts as is, shares in percent."""
    x = m[name]
    return f"{x:.3f}" if name in NUMERIC else str(x) if name.startswith("n_") else pct(x)


EXAMPLES = 5   # rows shown, gold beside answer, in a free-form report


def free_form_report(cfg: EvalConfig, task: Task, runs: dict, names: dict, metrics: dict) -> list[str]:
    """The table of exact match, character F1, the answers' loss and empty answers, then a few rows to read."""
    stop, columns = "".join(f", at {s!r}" for s in task.stop or []), metric_columns(task)
    out = [f"Free-form answers, greedy (stopping at EOS{stop} or after {cfg.max_new_tokens or task.answer_budget} "
           f"tokens), each scored against its best reference after NFKC and stripping surrounding whitespace:", "",
           "| model | exact match | char F1 | answer loss | empty answers |" + "".join(f" {c} |" for c in columns),
           "|---|---|---|---|---|" + "---|" * len(columns)]
    for k, r in runs.items():
        m = r["metrics"]
        loss = "-" if m["answer_loss"] is None else f"{m['answer_loss']:.3f}"
        out.append(f"| {names[k]} | {pct(m['exact_match'])} | {pct(m['char_f1'])} | {loss} | {pct(m['empty_rate'])} |"
                   + "".join(f" {cell(c, m)} |" for c in columns))
    if task.llm_jp_eval_metrics:
        out += ["", "llm-jp-eval's metrics under its own names (metrics.json's llm_jp_eval; its char_f1 is thefuzz's "
                "token_sort_ratio / 100, not SQuAD's char F1): " + "; ".join(
                    f"{names[k]}: " + ", ".join(f"{n} {v:.3f}" for n, v in r["metrics"]["llm_jp_eval"].items())
                    for k, r in runs.items())]
    if "n_unparsable" in columns:
        out += ["", f"Answers read as numbers by llm-jp-eval's rule (only digits and '.' kept); n_unparsable were no "
                    f"number and count as {UNPARSABLE}."]
    out += ["", f"{metrics['rows_per_s']} rows/s, {metrics['seconds']} s.", "", "Examples (the first rows):", ""]
    for i in range(min(EXAMPLES, metrics["n_rows"])):
        golds = runs[next(iter(runs))]["predictions"][i]["gold"]
        out.append(f"- gold {' / '.join(map(repr, golds))}: " +
                   "; ".join(f"{names[k]} {r['predictions'][i]['answer']!r}" for k, r in runs.items()))
    return out + [""]
