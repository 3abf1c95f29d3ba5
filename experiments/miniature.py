"""The whole experiment in miniature, on a laptop CPU: `python experiments/miniature.py --out runs/micro`.

1. train a 4,000-token byte-level BPE (OpenCALM's special ids) on the task's training text;
2. pretrain a tiny GPT-NeoX from random weights on that raw text (a plain causal LM, every parameter);
3. save it as an ordinary checkpoint folder (config.json, model.safetensors, tokenizer.json);
4. evaluate it with the task's prompt (greedy answers and label likelihood);
5. LoRA-fine-tune it through the same code path as train_lora.py;
6. evaluate again and print the before/after table (beside the post's, for marc-ja).
Everything runs through minicalm's own train() and evaluate_rows(); nothing here re-implements them. Data: the
task's own (for marc-ja a fixed 10,000 / 1,000-row sample of MARC-ja from the hub, cached), or --train-file and
--valid-file, which is how it runs offline. `--sweep-ranks 1,2,4,...` trains one adapter per rank on one base,
`--sweep-variants lora,dora,...` one per variant of LoRA, `--free-form` a free-form story on the same base (each
review's first sentence, written out: zero-shot, k-shot and after LoRA), and `--jglue` JGLUE's two other kinds of
task built from the reviews (a multiple-choice question and a number, before and after LoRA). The flags are
MiniatureConfig's fields (--help lists them).

An experiment, not a part of the library: it imports minicalm as a user would (pip install -e . first).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from minicalm.config import BLOCK_LINEARS, CalmConfig, LoraConfig
from minicalm.io.adapter import load_adapter
from minicalm.io.files import read_records, write_json, write_text
from minicalm.io.tokenizer import load_tokenizer, train_tokenizer
from minicalm.io.weights import load_model, save_checkpoint
from minicalm.lora import DoRALinear, trainable_parameters
from minicalm.model import CalmForCausalLM
from minicalm.tasks import data
from minicalm.tasks.task import MARC_JA, POST_HEADER, load_task
from minicalm.tools.cli import command
from minicalm.tools.evaluate import EvalConfig, draw_shots, evaluate_rows, pct, table
from minicalm.tools.plot import draw_if_possible, plot_dora_analysis, plot_losses, plot_sweep
from minicalm.tools.run import fmt_time
from minicalm.train import TrainConfig, train

PROG = "experiments/miniature.py"
SAMPLE = {"train": 10_000, "validation": 1_000}   # rows of the task's own data the miniature uses by default


@dataclass
class MiniatureConfig:
    """The miniature's settings; each field is a flag of experiments/miniature.py (lora_r -> --lora-r)."""
    out: str = "runs/micro"                  # the output folder (a sweep: one subfolder per adapter); refused if
                                             # an earlier run left there what this one writes (nothing is reused):
                                             # choose another or delete it
    task: str = "marc-ja"                    # built-in task (marc-ja, jnli) or a task JSON file
    train_file: str | None = None            # JSON lines of the task's rows; default: a fixed sample of the task's
                                             # own training data from the hub
    valid_file: str | None = None            # JSON lines; default: a fixed sample of its validation data
    pretrain_steps: int = 3000               # steps of 16 x 128 tokens
    pretrain_minutes: float | None = None    # also stop pretraining after this long
    lora_epochs: float = 3.0                 # LoRA's passes over the training set
    lora_steps: int | None = None            # stop LoRA after this many steps (a quick run)
    seed: int = 1337                         # the weights' initialisation, data order, LoRA's A, dropout
    sweep_ranks: str | None = None           # comma-separated LoRA ranks (e.g. 1,2,4,8,16,64): train and evaluate
                                             # one adapter per rank on one pretrained base instead of the
                                             # before/after story
    sweep_variants: str | None = None        # comma-separated variants of lora, dora, rslora, pissa, olora,
                                             # loraplus, qlora: one adapter each, at --lora-r or at each of
                                             # --sweep-ranks, on one pretrained base
    lora_r: int = 16                         # the variant sweep's rank (alpha is 2r)
    use_rslora: bool = False                 # the rank sweep with rsLoRA's alpha / sqrt(r)
    lora_targets: tuple[str, ...] = BLOCK_LINEARS   # the sweep's targets, of query_key_value, dense,
                                                    # dense_h_to_4h, dense_4h_to_h
    base: str | None = None                  # the sweep's or the free-form story's pretrained base (e.g.
                                             # runs/micro/pretrain/model); default: pretrain one first
    free_form: bool = False                  # the free-form story instead: Alpaca-format rows built from the
                                             # task's reviews (write the review's first sentence), answered by the
                                             # base zero-shot, with --shots solved rows, and after LoRA; exact match
                                             # and char F1 in free_form.md
    shots: int = 3                           # the free-form story's k-shot row: solved training rows before each
                                             # question
    sentence_chars: int = 40                 # the free-form story's rows: reviews whose first sentence is at most
                                             # this many characters
    jglue: bool = False                      # JGLUE's other two kinds of task instead, built from the task's
                                             # reviews: a multiple-choice question (JCommonsenseQA's kind) and a
                                             # number (JSTS's), each before and after LoRA, in jglue.md


def micro_config(vocab_size: int) -> CalmConfig:
    """3 layers, hidden 128, 4 heads, OpenCALM's layout (sequential residual, full rotary): 1.6M parameters with
    the 4,000-token BPE (1.0M of them the embedding and the head)."""
    return CalmConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=512)


def task_files(task, train_file: str | None, valid_file: str | None) -> tuple[str, str]:
    """The given files, or a fixed sample of the task's own data from the hub."""
    if train_file and valid_file:
        return train_file, valid_file
    return tuple(str(data.task_data(task, split, subset=SAMPLE[split])) for split in ("train", "validation"))


PRETRAINED = ("tokenizer", "init", "pretrain")   # what pretrain() writes in the output folder


def start(cfg: MiniatureConfig, log: bool, writes: list[str]):
    """What run and sweep begin with: the task, cfg with its data files found (the given ones or the task's own),
    the output folder and a stage printer. Refuses an output folder that already holds any of `writes` before
    anything is read or written: nothing is reused, and this run's files would overwrite and mix with the earlier's."""
    used = [name for name in writes if (Path(cfg.out) / name).exists()]
    if used:
        raise FileExistsError(f"--out {cfg.out} already holds {', '.join(used)} from an earlier run; choose another "
                              f"--out or delete it")
    t0, task = time.time(), load_task(cfg.task)
    train_file, valid_file = task_files(task, cfg.train_file, cfg.valid_file)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = lambda msg: log and print(f"\n[{fmt_time(time.time() - t0)}] {msg}", file=sys.stderr, flush=True)
    cfg = replace(cfg, task=str(cfg.task), train_file=train_file, valid_file=valid_file)
    return t0, cfg, task, out_dir, stage


def pretrain(out_dir: Path, cfg: MiniatureConfig, vocab_size: int, log: bool, stage) -> tuple[Path, dict]:
    """Steps 1-3: a BPE on the training text, a tiny GPT-NeoX pretrained on it, saved as a checkpoint folder
    (cfg's task, data files, pretrain_steps, pretrain_minutes and seed)."""
    task, steps, minutes = load_task(cfg.task), cfg.pretrain_steps, cfg.pretrain_minutes
    stage(f"1/6 tokenizer: byte-level BPE, {vocab_size} tokens, on {cfg.train_file}")
    texts = [r.text for r in data.read_jsonl(cfg.train_file, task)]
    # The prompt's English header is ordinary text for OpenCALM's tokenizer; let ours know it too.
    empty = task.format({f: "" for f in task.fields})
    tok = train_tokenizer(texts + [empty] * 100, out_dir / "tokenizer" / "tokenizer.json", vocab_size)

    stage("2/6 pretraining a tiny GPT-NeoX from random weights on the raw text")
    init = out_dir / "init"
    save_checkpoint(CalmForCausalLM(micro_config(tok.vocab_size)).init_weights(seed=cfg.seed), init,
                    tokenizer_dir=tok.path.parent)
    pre = train(TrainConfig(
        model=str(init), task=cfg.task, train_file=cfg.train_file, valid_file=cfg.valid_file,
        out=str(out_dir / "pretrain"), full=True, text=True, max_len=128, batch_size=16, micro_batch_size=16, lr=2e-3,
        weight_decay=0.1, warmup_steps=min(100, max(1, steps // 10)), max_steps=steps,
        max_time=minutes and minutes * 60, eval_every=0, eval_limit=200, save_every=0, device="cpu", seed=cfg.seed,
        log=log, resume=False))
    return out_dir / "pretrain" / "model", pre   # 3. an ordinary checkpoint folder, written by train()


def finetune(base: Path, out: Path, cfg: MiniatureConfig, setting: dict, log: bool, on_step=None) -> dict:
    """Step 5: LoRA on the base through train_lora.py's code path (alpha = 2 r, lr 5e-4, batch 16) on cfg's task,
    data files, lora_targets, lora_epochs, lora_steps and seed. `setting` is {"r": rank} and a variant's TrainConfig
    settings (VARIANTS): its "lora" ones (use_dora, use_rslora, init) go into the LoraConfig, the others
    (loraplus_lr_ratio, quantize) into TrainConfig."""
    r, steps = setting["r"], cfg.lora_steps
    lora = LoraConfig(r=r, alpha=2 * r, dropout=0.05, targets=tuple(cfg.lora_targets), **setting.get("lora", {}))
    variant = {k: v for k, v in setting.items() if k not in ("r", "variant", "lora")}
    return train(TrainConfig(
        model=str(base), task=cfg.task, train_file=cfg.train_file, valid_file=cfg.valid_file, out=str(out),
        epochs=cfg.lora_epochs, max_steps=steps, lr=5e-4, batch_size=16, micro_batch_size=16, max_len=256,
        warmup_steps=50 if steps is None else max(1, steps // 10), lora=lora, eval_every=0, eval_limit=200,
        save_every=0, device="cpu", seed=cfg.seed, log=log, **variant), on_step=on_step)


def run(cfg: MiniatureConfig, eval_limit: int | None = None, vocab_size: int = 4000, log: bool = True) -> dict:
    """The before/after story (steps 1-6) in cfg.out: results.json and report.md. eval_limit: the held-out rows
    evaluated (default all); vocab_size: the BPE's."""
    t0, cfg, task, out_dir, stage = start(cfg, log, [*PRETRAINED, "lora", "results.json", "report.md"])
    base, pre = pretrain(out_dir, cfg, vocab_size, log, stage)

    valid = data.read_jsonl(cfg.valid_file, task, limit=eval_limit)
    tok, kw = load_tokenizer(base), dict(max_len=256, batch_size=32, mode="both", log=log)
    stage(f"4/6 evaluating the pretrained model on {len(valid)} rows with the task's prompt")
    model = load_model(base)
    before = evaluate_rows(model, tok, valid, task, **kw)

    stage("5/6 LoRA fine-tuning (r 16, alpha 32, all four linear layers) with the train_lora.py code path")
    # the story's adapter whatever the sweep's flags (--lora-r, --lora-targets) say
    tuned = finetune(base, out_dir / "lora", replace(cfg, lora_targets=BLOCK_LINEARS), {"r": 16}, log)

    stage("6/6 evaluating base + adapter")
    load_adapter(model, out_dir / "lora" / "adapter")   # onto the same base model evaluated before
    after = evaluate_rows(model, tok, valid, task, **kw)

    seconds = time.time() - t0
    res = {"seconds": round(seconds, 1), "params": trainable_parameters(model)[1],
           "pretrain": {k: pre[k] for k in ("step", "loss", "val_loss", "seconds")},
           "lora": {k: tuned[k] for k in ("step", "loss", "val_loss", "seconds")},
           "before": before["metrics"], "after": after["metrics"], "n_valid": len(valid), "task": task.name}
    return save_results(out_dir, "results.json", "report.md", res, format_report(res), log)


# LoRA's variants as the sweep names them: TrainConfig settings, the adapter's own under "lora" (LoraConfig's
# fields); variants.py has their formulas and papers.
VARIANTS = {"lora": {}, "dora": {"lora": {"use_dora": True}}, "rslora": {"lora": {"use_rslora": True}},
            "pissa": {"lora": {"init": "pissa"}}, "olora": {"lora": {"init": "olora"}},
            "loraplus": {"loraplus_lr_ratio": 16.0}, "qlora": {"quantize": "nf4"}}


def sweep(cfg: MiniatureConfig, settings: dict[str, dict], eval_limit: int | None = None, vocab_size: int = 4000,
          log: bool = True) -> list[dict]:
    """One adapter per setting ({label: {"r": ..., and variant settings}}, as sweep_settings makes them) on cfg's
    targets (lora_targets) and one pretrained base (cfg.base, or pretrained here): accuracy, invalid rate, macro-F1,
    trainable parameters and time per step of each, and each run's loss curve; for LoRA and DoRA also the magnitude
    and direction changes of one layer at every step (DoRA's section 3.2). Writes sweep.json, sweep.md and the
    pictures (when matplotlib is there)."""
    t0, cfg, task, out_dir, stage = start(cfg, log, [*(PRETRAINED if cfg.base is None else ()), *settings,
                                                     "sweep.json", "sweep.md"])
    base, targets = cfg.base, cfg.lora_targets
    if base is None:
        base = pretrain(out_dir, cfg, vocab_size, log, stage)[0]
    tok, valid, rows = load_tokenizer(base), data.read_jsonl(cfg.valid_file, task, limit=eval_limit), []
    for label, setting in settings.items():
        stage(f"{label}: LoRA r {setting['r']} (alpha {2 * setting['r']}) on {', '.join(targets)}")
        tracker = DirectionAndMagnitude(TRACKED) if label in ("lora", "dora") else None
        res = finetune(Path(base), out_dir / label, cfg, setting, log, on_step=tracker)
        m = evaluate_rows(res["model"], tok, valid, task, max_len=256, batch_size=32, log=log)["metrics"]
        rows.append({"label": label, **setting, "alpha": 2 * setting["r"],
                     "trainable": trainable_parameters(res["model"])[0], "accuracy": m["accuracy"],
                     "invalid_rate": m["invalid_rate"], "macro_f1": m["macro_f1"], "steps": res["step"],
                     "seconds_per_step": round(res["seconds"] / res["step"], 3),
                     "loss": [x["loss"] for x in read_records(out_dir / label / "metrics.jsonl")],
                     **({"dora_analysis": tracker.points} if tracker else {})})
    write_sweep(out_dir, rows, base, targets, task, len(valid))
    return rows


TRACKED = "gpt_neox.layers.1.attention.query_key_value"   # the layer whose weight DoRA's analysis follows


class DirectionAndMagnitude:
    """DoRA's analysis (Liu et al. 2024, section 3.2, figure 2): after each step, how far a layer's merged weight
    W' moved in magnitude, dM = mean_i | ||w'_i|| - ||w_i|| |, and in direction, dD = mean_i (1 - cos(w'_i, w_i)),
    over its output rows w_i (DoRA's magnitudes). LoRA moves both together; DoRA can move one without the other."""

    def __init__(self, name: str):
        self.name, self.points = name, []

    @torch.no_grad()
    def __call__(self, run, record: dict) -> None:
        layer = run.model.get_submodule(self.name)
        W = layer.weight.float()
        merged = W + layer.delta()                            # W + s B A: LoRA's, and DoRA's direction
        length = layer.lora_magnitude_vector.float() if isinstance(layer, DoRALinear) else merged.norm(dim=1)
        dM = (length - W.norm(dim=1)).abs().mean().item()
        dD = (1 - F.cosine_similarity(merged, W, dim=1)).mean().item()
        self.points.append({"step": record["step"], "dM": dM, "dD": dD})


def write_sweep(out_dir: Path, rows: list[dict], base, targets, task, n_valid: int) -> None:
    """sweep.json, sweep.md and the pictures: accuracy against rank (a rank sweep), every run's loss curve, and
    DoRA's analysis when LoRA and DoRA both ran."""
    lines = ["| run | r | alpha | trainable parameters | accuracy | no valid answer | macro-F1 | s / step |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['label']} | {x['r']} | {x['alpha']} | {x['trainable']:,} | {100 * x['accuracy']:.1f}% | "
              f"{100 * x['invalid_rate']:.1f}% | {x['macro_f1']:.3f} | {x['seconds_per_step']:.3f} |" for x in rows]
    write_json(out_dir / "sweep.json", {"base": os.path.relpath(base, out_dir), "targets": list(targets),
                                        "task": task.name, "n_valid": n_valid, "runs": rows})   # no machine paths
    write_text(out_dir / "sweep.md", "\n".join(lines) + "\n")
    title = f"{task.name}, {n_valid} held-out rows; targets {', '.join(targets)}"
    if len({x["r"] for x in rows}) > 1:   # a rank sweep
        draw_if_possible(plot_sweep, rows, out_dir / "sweep.png", f"LoRA rank sweep, {title}", prog="miniature")
    draw_if_possible(plot_losses, {x["label"]: x["loss"] for x in rows}, out_dir / "losses.png",
                     f"training loss per step, {title}", prog="miniature")
    analysis = {x["label"]: x["dora_analysis"] for x in rows if "dora_analysis" in x}
    if len(analysis) == 2:
        draw_if_possible(plot_dora_analysis, analysis, out_dir / "dora_analysis.png", TRACKED, prog="miniature")
    print("\n" + "\n".join(lines))


def format_report(res: dict) -> str:
    b, a = res["before"], res["after"]
    rows = [(f"micro GPT-NeoX ({res['params'] / 1e6:.1f}M params) before LoRA", b), ("micro GPT-NeoX + LoRA", a)]
    lik = lambda m: f"{100 * m['likelihood']['accuracy']:.1f}%"
    g = b["generate"]
    return "\n".join([
        f"Miniature on {res['n_valid']} held-out rows of task {res['task']} (greedy answers to its prompt):", "",
        table(rows, post=res["task"] == MARC_JA.name), "",
        f"Label-likelihood accuracy: before {lik(b)}, after {lik(a)}. Majority class ({g['majority_label']}): "
        f"{100 * g['majority_baseline']:.1f}%.",
        f"Pretraining: {res['pretrain']['step']} steps, loss {res['pretrain']['loss']:.3f}; LoRA: "
        f"{res['lora']['step']} steps, answer loss {res['lora']['loss']:.4f}. Total {fmt_time(res['seconds'])}.", ""])


# ----------------------------------------------------------------------------- the free-form story

# Each review's first sentence, written out: the answer is a span of the input, review text of the kind the base
# was pretrained on; to copy it the model needs attention's own move (look back at the input's start, then at the
# token after the one just written) and to learn where to stop (the first 。, then EOS). Not a label in disguise:
# every answer is a text of its own. The miniature's base turns out to have no copying circuit, and minutes of LoRA
# do not build one: it learns the answer's form, not the copy (the README's table).
INSTRUCTION = "このレビューの最初の文を書き写して。"   # "copy out this review's first sentence"
# one line of at most 48 tokens (a 40-character sentence takes at most 34 with the miniature's tokenizer)
FREE_FORM_TASK = {"from": "alpaca", "name": "first-sentence", "max_new_tokens": 48, "stop": ["\n"]}
FREE_FORM_LEN = 256       # prompt tokens; a longer review is cut at its end, its first sentence kept
SHOT_CHARS = 80           # the k-shot row's solved rows: training reviews at most this long, so that K of them and
                          # the question fit the model's positions
EXAMPLES = 3              # held-out rows shown in free_form.md


def first_sentence_rows(rows: list[data.Row], chars: int = 40) -> list[dict]:
    """Alpaca-format rows (instruction, input, output) from a task's rows: the input is the row's text, the output
    its first sentence up to and including 。, kept where that sentence is one line of at most `chars` characters
    and more text follows it (so the answer is never simply the whole input)."""
    out = []
    for r in rows:
        text = r.text.strip()
        first = text[:text.find("。") + 1]
        if first and "\n" not in first and len(first) <= chars and text[len(first):].strip():
            out.append({"instruction": INSTRUCTION, "input": text, "output": first})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def run_free_form(cfg: MiniatureConfig, eval_limit: int | None = None, vocab_size: int = 4000,
                  log: bool = True) -> dict:
    """The free-form story in cfg.out: on the pretrained base (cfg.base, or pretrained here) the first-sentence task
    built from cfg's task rows (free_form/: train.jsonl, valid.jsonl, task.json, and shots.jsonl, the short training
    rows the shots are drawn from); the base's answers zero-shot and with cfg.shots solved rows before each question;
    LoRA (r 16 on all four targets, the story's settings) and its answers; free_form.json and free_form.md.
    eval_limit: the held-out rows answered (default all)."""
    t0, cfg, task, out_dir, stage = start(cfg, log, [*(PRETRAINED if cfg.base is None else ()), "free_form",
                                                     "free_form.json", "free_form.md"])
    base = cfg.base or pretrain(out_dir, cfg, vocab_size, log, stage)[0]
    folder = out_dir / "free_form"
    stage(f"free-form 1/5 rows: each review's first sentence (at most {cfg.sentence_chars} characters), Alpaca "
          f"format")
    made = {split: first_sentence_rows(data.read_jsonl(path, task), cfg.sentence_chars)
            for split, path in (("train", cfg.train_file), ("valid", cfg.valid_file))}
    made["shots"] = [r for r in made["train"] if len(r["input"]) <= SHOT_CHARS]
    folder.mkdir(parents=True, exist_ok=True)
    files = {split: write_jsonl(folder / f"{split}.jsonl", rows) for split, rows in made.items()}
    write_json(folder / "task.json", FREE_FORM_TASK)
    ff = load_task(folder / "task.json")
    valid = data.read_jsonl(files["valid"], ff, limit=eval_limit)

    tok, model = load_tokenizer(base), load_model(base)
    params = trainable_parameters(model)[1]   # the base's, before LoRA's are added
    settings = EvalConfig(max_len=FREE_FORM_LEN, batch_size=32, shots=cfg.shots, shots_file=files["shots"],
                          seed=cfg.seed, log=log)
    stage(f"free-form 2/5 the base zero-shot on {len(valid)} held-out rows")
    runs = {"before": evaluate_rows(model, tok, valid, ff, settings)}
    stage(f"free-form 3/5 the base with {cfg.shots} solved training rows before each question")
    shot_task = ff.with_shots(draw_shots(settings, ff, valid))
    # the shots come on top of max_len, so each question keeps the room it has zero-shot, as far as the model's
    # positions allow (past that a long review is cut further, at its end)
    fixed = lambda t: 10**6 - data.PromptEncoder(tok, 10**6, t).field_budget   # the template's own tokens
    max_len = min(FREE_FORM_LEN + fixed(shot_task) - fixed(ff), model.config.max_position_embeddings - ff.answer_budget)
    runs["k_shot"] = evaluate_rows(model, tok, valid, shot_task, settings, max_len=max_len)

    stage("free-form 4/5 LoRA fine-tuning (r 16, alpha 32, all four linear layers) on the rows")
    rows_cfg = replace(cfg, task=str(folder / "task.json"), train_file=files["train"], valid_file=files["valid"],
                       lora_targets=BLOCK_LINEARS)   # the story's adapter whatever --lora-targets says
    tuned = finetune(Path(base), folder / "lora", rows_cfg, {"r": 16}, log)
    stage("free-form 5/5 base + adapter zero-shot")
    load_adapter(model, folder / "lora" / "adapter")   # onto the same base model evaluated before
    runs["after"] = evaluate_rows(model, tok, valid, ff, settings)

    res = {"seconds": round(time.time() - t0, 1), "params": params, "task": ff.to_dict(),
           "rows": {split: len(rows) for split, rows in made.items()}, "n_valid": len(valid),
           "shots": cfg.shots, "lora": {k: tuned[k] for k in ("step", "loss", "val_loss", "seconds")},
           **{name: r["metrics"] for name, r in runs.items()},
           "examples": [{"input": row.fields["input"], "gold": row.label,
                         **{name: r["predictions"][i]["answer"] for name, r in runs.items()}}
                        for i, row in enumerate(valid[:EXAMPLES])]}
    return save_results(out_dir, "free_form.json", "free_form.md", res, format_free_form(res), log)


def save_results(out_dir: Path, numbers: str, table: str, res: dict, report: str, log: bool) -> dict:
    """A story's numbers (JSON) and its report (markdown) under out_dir, the report printed; returns the numbers."""
    write_json(out_dir / numbers, res)
    write_text(out_dir / table, report)
    if log:
        print("\n" + report)
    return res


def format_free_form(res: dict) -> str:
    """The table (zero-shot, k-shot, after LoRA) and a few held-out rows, gold beside each model's answer."""
    k = f"{res['shots']}-shot"
    names = {"before": f"micro GPT-NeoX ({res['params'] / 1e6:.1f}M params) before LoRA, zero-shot",
             "k_shot": f"micro GPT-NeoX before LoRA, {k}", "after": "micro GPT-NeoX + LoRA, zero-shot"}
    short = {"before": "zero-shot", "k_shot": k, "after": "+ LoRA"}
    lines = [f"Free-form miniature: write the review's first sentence ({res['n_valid']} held-out rows; greedy answers "
             f"stopping at EOS or a line break, at most {res['task']['max_new_tokens']} tokens, scored after NFKC):",
             "", "| model | exact match | char F1 | answer loss | empty answers |", "|---|---|---|---|---|"]
    for key, name in names.items():
        m = res[key]
        lo, hi = m["exact_match_ci95"]
        lines.append(f"| {name} | {pct(m['exact_match'])} ({pct(lo)} to {pct(hi)}) | {pct(m['char_f1'])} | "
                     f"{m['answer_loss']:.3f} | {pct(m['empty_rate'])} |")
    lines += ["", "Exact match with its 95% interval; char F1: SQuAD's F1 over characters; answer loss: the gold "
              "answer's mean token loss.", "", "Examples (the first held-out rows):", ""]
    for x in res["examples"]:
        lines.append(f"- gold {x['gold']!r}: " + "; ".join(f"{short[key]} {x[key]!r}" for key in short))
    lora = res["lora"]
    lines += ["", f"Rows: {res['rows']['train']} to train on, {res['rows']['valid']} held out. LoRA: {lora['step']} "
              f"steps in {fmt_time(lora['seconds'])}, answer loss {lora['loss']:.4f}. Total "
              f"{fmt_time(res['seconds'])}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- JGLUE's other kinds, in miniature

# Multiple choice (JCommonsenseQA's kind): which of five words says how this reviewer felt? Every row offers one word
# of praise, one of complaint and three of what reviews talk about, drawn from three lists, so the choices differ in
# every row and in length (1 to 7 characters); the choices alone say only that it is one of two, the review which.
# Learnable from what the base's pretraining text holds: how praise and complaint read. Chance: 20% (50% for a model
# that knows the two kinds of word but not the review). Tried first and dropped: one word of the review's kind among
# four of the other (the odd one out answers it without the review: 99.8% after LoRA), and other reviews' opening
# sentences as the choices (LoRA on the right one's text learned the sentences, not the choice: 25.4% both before and
# after).
PRAISE = ("満足", "最高", "おすすめ", "便利", "気に入った", "快適", "丈夫", "綺麗", "安心", "買ってよかった", "使いやすい", "良い")
COMPLAINT = ("残念", "最悪", "不良品", "壊れた", "返品", "がっかり", "使えない", "期待外れ", "不満", "二度と買わない", "届かない",
             "高い")
TOPICS = ("配送", "説明書", "色", "サイズ", "箱", "電池", "ケース", "画面", "重さ", "音", "値段", "デザイン")
FEELING_WORD = {
    "name": "feeling-word",
    "prompt": POST_HEADER + "このレビューを書いた人の気持ちに合う言葉を選択肢から選んで、その言葉を書いて。\n\n### Input:\n"
                            "{review}\n選択肢:\n" + "".join(f"- {{choice{k}}}\n" for k in range(5)) + "\n### Response:\n",
    "choice_fields": [f"choice{k}" for k in range(5)], "cut": ["review"]}
# A number (JSTS's kind): five opening sentences of reviews, k of them from positive ones; the answer is k written as
# 0.0 to 5.0. Learnable from the same signal, summed over the lines; scored by Pearson and Spearman (0 for a constant
# or no answer: the before row).
HOW_POSITIVE = {
    "name": "how-positive",
    "prompt": POST_HEADER + "次の5つの文のうち、肯定的なレビューの文はいくつですか?0.0から5.0の数で書いて。\n\n### Input:\n"
                            "{text}\n\n### Response:\n",
    "answer_field": "positives", "metrics": ["pearson", "spearman"], "decimals": 1, "max_new_tokens": 8,
    "stop": ["\n"]}
STORY_ROWS = {"train": 6000, "valid": 500}   # rows made for each story from the reviews


def openings(rows: list[data.Row], chars: int = 40) -> dict[str, list[str]]:
    """Each label's opening sentences (up to and including the first 。) of at most `chars` characters, one line."""
    out: dict[str, list[str]] = {}
    for r in rows:
        first = r.text.strip()[:r.text.strip().find("。") + 1]
        if first and "\n" not in first and len(first) <= chars:
            out.setdefault(r.label, []).append(first)
    return out


def feeling_word_rows(rows: list[data.Row], n: int, seed: int) -> list[dict]:
    """n questions: a review and, in a random order, a word of praise, one of complaint and three topics; the answer
    is the word of the review's sentiment."""
    rng, out = random.Random(seed), []
    for r in rng.sample(rows, min(n, len(rows))):
        right = rng.choice(PRAISE if r.label == "positive" else COMPLAINT)
        choices = [right, rng.choice(COMPLAINT if r.label == "positive" else PRAISE), *rng.sample(TOPICS, 3)]
        rng.shuffle(choices)
        out.append({"review": r.text, **{f"choice{k}": c for k, c in enumerate(choices)}, "label": choices.index(right)})
    return out


def how_positive_rows(rows: list[data.Row], n: int, seed: int) -> list[dict]:
    """n texts of five openings, k (uniform over 0..5) of them from positive reviews, shuffled; the answer k."""
    rng, pool = random.Random(seed), openings(rows)
    out = []
    for _ in range(n):
        k = rng.randrange(6)
        lines = rng.sample(pool["positive"], k) + rng.sample(pool["negative"], 5 - k)
        rng.shuffle(lines)
        out.append({"text": "\n".join(lines), "positives": float(k)})
    return out


def run_jglue(cfg: MiniatureConfig, eval_limit: int | None = None, vocab_size: int = 4000, log: bool = True) -> dict:
    """Both stories in cfg.out/jglue/: their rows and task files (made from the task's reviews, training and held-out
    apart), the base's scores, LoRA (r 16 on all four targets, the story's settings) and its scores; jglue.json and
    jglue.md. eval_limit: the held-out rows scored (default all)."""
    t0, cfg, task, out_dir, stage = start(cfg, log, [*(PRETRAINED if cfg.base is None else ()), "jglue",
                                                     "jglue.json", "jglue.md"])
    base = cfg.base or pretrain(out_dir, cfg, vocab_size, log, stage)[0]
    reviews = {split: data.read_jsonl(path, task) for split, path in (("train", cfg.train_file),
                                                                     ("valid", cfg.valid_file))}
    tok, res = load_tokenizer(base), {"seconds": 0.0, "stories": {}}
    for spec, make in ((FEELING_WORD, feeling_word_rows), (HOW_POSITIVE, how_positive_rows)):
        folder = out_dir / "jglue" / spec["name"]
        folder.mkdir(parents=True, exist_ok=True)
        files = {split: write_jsonl(folder / f"{split}.jsonl", make(reviews[split], STORY_ROWS[split], cfg.seed + i))
                 for i, split in enumerate(("train", "valid"))}
        write_json(folder / "task.json", spec)
        story = load_task(folder / "task.json")
        valid = data.read_jsonl(files["valid"], story, limit=eval_limit)
        settings = EvalConfig(batch_size=32, max_len=256, log=log)
        stage(f"{story.name}: the base on {len(valid)} held-out rows")
        before = evaluate_rows(load_model(base), tok, valid, story, settings)
        stage(f"{story.name}: LoRA (r 16, alpha 32, all four linear layers) on {STORY_ROWS['train']} rows")
        tuned = finetune(Path(base), folder / "lora", replace(cfg, task=str(folder / "task.json"),
                                                              train_file=files["train"], valid_file=files["valid"],
                                                              lora_targets=BLOCK_LINEARS), {"r": 16}, log)
        stage(f"{story.name}: base + adapter")
        after = evaluate_rows(tuned["model"], tok, valid, story, settings)
        res["stories"][story.name] = {"task": spec, "n_valid": len(valid), "before": before["metrics"],
                                      "after": after["metrics"], "chance": before["metrics"].get("chance"),
                                      "lora": {k: tuned[k] for k in ("step", "loss", "val_loss", "seconds")}}
    res["seconds"] = round(time.time() - t0, 1)
    return save_results(out_dir, "jglue.json", "jglue.md", res, format_jglue(res), log)


def format_jglue(res: dict) -> str:
    """One table: each story's metrics before and after LoRA, with chance."""
    lines = ["| task (held-out rows) | chance | metric | micro GPT-NeoX before LoRA | + LoRA |", "|---|---|---|---|---|"]
    for name, x in res["stories"].items():
        b, a = x["before"], x["after"]
        if "accuracy_norm" in b:
            lines.append(f"| {name}: which of 5 choices ({x['n_valid']}) | {pct(x['chance'])} | accuracy / "
                         f"accuracy_norm | {pct(b['accuracy'])} / {pct(b['accuracy_norm'])} | {pct(a['accuracy'])} / "
                         f"{pct(a['accuracy_norm'])} |")
        else:
            cell = lambda m: f"{m['pearson']:.3f} / {m['spearman']:.3f} ({m['n_unparsable']} no number)"  # noqa: E731
            lines.append(f"| {name}: a number 0.0-5.0 ({x['n_valid']}) | 0.000 | Pearson / Spearman | {cell(b)} | "
                         f"{cell(a)} |")
    steps = "; ".join(f"{name}: {x['lora']['step']} steps in {fmt_time(x['lora']['seconds'])}, loss "
                      f"{x['lora']['loss']:.3f}" for name, x in res["stories"].items())
    return "\n".join(lines + ["", f"LoRA: {steps}. Total {fmt_time(res['seconds'])}.", ""])


def miniature(cfg: MiniatureConfig):
    """The command: the before/after story, with --free-form the free-form story, --jglue JGLUE's other kinds, or
    with --sweep-ranks or --sweep-variants a sweep."""
    if cfg.free_form or cfg.jglue:
        if cfg.sweep_ranks or cfg.sweep_variants or cfg.free_form and cfg.jglue:
            raise ValueError("--free-form and --jglue are stories of their own: one at a time, not with --sweep-ranks "
                             "or --sweep-variants")
        return run_free_form(cfg) if cfg.free_form else run_jglue(cfg)
    if cfg.sweep_ranks or cfg.sweep_variants:
        return sweep(cfg, sweep_settings(cfg))
    return run(cfg)


def main(argv: list[str] | None = None):
    """Flags from MiniatureConfig's fields; a bad setting or input ends it with one line and exit status 1."""
    return command(MiniatureConfig, miniature, PROG, __doc__, argv)


def sweep_settings(a: MiniatureConfig) -> dict[str, dict]:
    """--sweep-ranks and/or --sweep-variants as {label: {"r": rank, "variant": name} | VARIANTS[name]}: every
    variant at every rank."""
    names = a.sweep_variants.split(",") if a.sweep_variants else ["rslora" if a.use_rslora else "lora"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--sweep-variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    ranks = [int(r) for r in a.sweep_ranks.split(",")] if a.sweep_ranks else [a.lora_r]
    label = lambda v, r: (f"{v}-r{r}" if a.sweep_variants else f"r{r}" + "-rslora" * a.use_rslora) if a.sweep_ranks \
        else v
    return {label(v, r): {"r": r, "variant": v} | VARIANTS[v] for v in names for r in ranks}


if __name__ == "__main__":
    main()
