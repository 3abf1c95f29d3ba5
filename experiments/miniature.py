"""The whole experiment in miniature, on a laptop CPU: `python experiments/miniature.py --out runs/micro`.

1. train a 4,000-token byte-level BPE (OpenCALM's special ids) on the task's training text;
2. pretrain a tiny GPT-NeoX from random weights on that raw text (a plain causal LM, every parameter);
3. save it as an ordinary checkpoint folder (config.json, model.safetensors, tokenizer.json);
4. evaluate it with the task's prompt (greedy answers and label likelihood);
5. LoRA-fine-tune it through the same code path as train_lora.py;
6. evaluate again and print the before/after table (beside the post's, for marc-ja).
Everything runs through minicalm's own train() and evaluate_rows(); nothing here re-implements them. Data: the
task's own (for marc-ja a fixed 10,000 / 1,000-row sample of MARC-ja from the hub, cached), or --train-file and
--valid-file, which is how it runs offline. `--sweep-ranks 1,2,4,...` trains one adapter per rank on one base.

An experiment, not a part of the library: it imports minicalm as a user would (pip install -e . first).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicalm.tasks import data
from minicalm.io.adapter import load_adapter
from minicalm.config import CalmConfig
from minicalm.tools.evaluate import evaluate_rows, table
from minicalm.io.files import read_records, write_json, write_text
from minicalm.config import BLOCK_LINEARS
from minicalm.model import CalmForCausalLM
from minicalm.nf4 import trainable_parameters
from minicalm.tools.plot import draw_if_possible, plot_dora_analysis, plot_losses, plot_sweep
from minicalm.progress import fmt_time
from minicalm.tasks.task import MARC_JA, load_task
from minicalm.io.tokenizer import load_tokenizer, train_tokenizer
from minicalm.train import TrainConfig, train
from minicalm.io.weights import load_model, save_checkpoint

SAMPLE = {"train": 10_000, "validation": 1_000}   # rows of the task's own data the miniature uses by default


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


def start(out: str, spec, train_file: str | None, valid_file: str | None, log: bool):
    """What run and sweep begin with: the task, its files, the output folder and a stage printer."""
    t0, task = time.time(), load_task(spec)
    train_file, valid_file = task_files(task, train_file, valid_file)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = lambda msg: log and print(f"\n[{fmt_time(time.time() - t0)}] {msg}", file=sys.stderr, flush=True)
    return t0, str(spec), task, train_file, valid_file, out_dir, stage


def pretrain(out_dir: Path, spec: str, train_file: str, valid_file: str, steps: int, minutes: float | None,
             vocab_size: int, seed: int, log: bool, stage) -> tuple[Path, dict]:
    """Steps 1-3: a BPE on the training text, a tiny GPT-NeoX pretrained on it, saved as a checkpoint folder."""
    task = load_task(spec)
    stage(f"1/6 tokenizer: byte-level BPE, {vocab_size} tokens, on {train_file}")
    texts = [r.text for r in data.read_jsonl(train_file, task)]
    # The prompt's English header is ordinary text for OpenCALM's tokenizer; let ours know it too.
    empty = task.format({f: "" for f in task.fields})
    tok = train_tokenizer(texts + [empty] * 100, out_dir / "tokenizer" / "tokenizer.json", vocab_size)

    stage("2/6 pretraining a tiny GPT-NeoX from random weights on the raw text")
    init = out_dir / "init"
    save_checkpoint(CalmForCausalLM(micro_config(tok.vocab_size)).init_weights(seed=seed), init,
                    tokenizer_dir=tok.path.parent)
    pre = train(TrainConfig(
        model=str(init), task=spec, train_file=train_file, valid_file=valid_file, out=str(out_dir / "pretrain"),
        full=True, text=True, max_len=128, batch_size=16, micro_batch_size=16, lr=2e-3, weight_decay=0.1,
        warmup_steps=min(100, max(1, steps // 10)), max_steps=steps, max_time=minutes and minutes * 60,
        eval_every=0, eval_limit=200, save_every=0, device="cpu", seed=seed, log=log, resume=False))
    return out_dir / "pretrain" / "model", pre   # 3. an ordinary checkpoint folder, written by train()


def finetune(base: Path, out: Path, spec: str, train_file: str, valid_file: str, r: int, targets, epochs: float,
             steps: int | None, seed: int, log: bool, on_step=None, **variant) -> dict:
    """Step 5: LoRA on the base through train_lora.py's code path (alpha = 2 r, lr 5e-4, batch 16); `variant` sets
    TrainConfig's use_dora, use_rslora, lora_init, loraplus_lr_ratio."""
    return train(TrainConfig(
        model=str(base), task=spec, train_file=train_file, valid_file=valid_file, out=str(out), epochs=epochs,
        max_steps=steps, lr=5e-4, batch_size=16, micro_batch_size=16, max_len=256,
        warmup_steps=50 if steps is None else max(1, steps // 10), lora_r=r, lora_alpha=2 * r, lora_dropout=0.05,
        lora_targets=tuple(targets), eval_every=0, eval_limit=200, save_every=0, device="cpu", seed=seed, log=log,
        **variant), on_step=on_step)


def run(out: str, train_file: str | None = None, valid_file: str | None = None, task: str = "marc-ja",
        pretrain_steps: int = 3000, pretrain_minutes: float | None = None, lora_epochs: float = 3.0,
        lora_steps: int | None = None, eval_limit: int | None = None, vocab_size: int = 4000, seed: int = 1337,
        log: bool = True) -> dict:
    t0, spec, task, train_file, valid_file, out_dir, stage = start(out, task, train_file, valid_file, log)
    base, pre = pretrain(out_dir, spec, train_file, valid_file, pretrain_steps, pretrain_minutes, vocab_size, seed,
                         log, stage)

    valid = data.read_jsonl(valid_file, task, limit=eval_limit)
    tok, kw = load_tokenizer(base), dict(max_len=256, batch_size=32, mode="both", log=log)
    stage(f"4/6 evaluating the pretrained model on {len(valid)} rows with the task's prompt")
    model = load_model(base)
    before = evaluate_rows(model, tok, valid, task, **kw)

    stage("5/6 LoRA fine-tuning (r 16, alpha 32, all four linear layers) with the train_lora.py code path")
    tuned = finetune(base, out_dir / "lora", spec, train_file, valid_file, 16, BLOCK_LINEARS, lora_epochs, lora_steps,
                     seed,
                 log)

    stage("6/6 evaluating base + adapter")
    load_adapter(model, out_dir / "lora" / "adapter")   # onto the same base model evaluated before
    after = evaluate_rows(model, tok, valid, task, **kw)

    seconds = time.time() - t0
    res = {"seconds": round(seconds, 1), "params": model.num_params(),
           "pretrain": {k: pre[k] for k in ("step", "loss", "val_loss", "seconds")},
           "lora": {k: tuned[k] for k in ("step", "loss", "val_loss", "seconds")},
           "before": before["metrics"], "after": after["metrics"], "n_valid": len(valid), "task": task.name}
    write_json(out_dir / "results.json", res)
    report = format_report(res)
    write_text(out_dir / "report.md", report)
    if log:
        print("\n" + report)
    return res


# LoRA's variants as the sweep names them: TrainConfig settings (variants.py has their formulas and papers).
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"lora_init": "pissa"},
            "olora": {"lora_init": "olora"}, "loraplus": {"loraplus_lr_ratio": 16.0}, "qlora": {"quantize": "nf4"}}


def sweep(out: str, settings: dict[str, dict], targets=BLOCK_LINEARS, base: str | None = None,
          train_file: str | None = None, valid_file: str | None = None, task: str = "marc-ja",
          pretrain_steps: int = 3000, lora_epochs: float = 3.0, lora_steps: int | None = None,
          eval_limit: int | None = None, vocab_size: int = 4000, seed: int = 1337, log: bool = True) -> list[dict]:
    """One adapter per setting ({label: {"r": ..., and variant settings}}) on one pretrained base (pretrained here,
    or --base): accuracy, invalid rate, macro-F1, trainable parameters and time per step of each, and each run's
    loss curve; for LoRA and DoRA also the magnitude and direction changes of one layer at every step (DoRA's
    section 3.2). Writes sweep.json, sweep.md and the pictures (when matplotlib is there)."""
    t0, spec, task, train_file, valid_file, out_dir, stage = start(out, task, train_file, valid_file, log)
    if base is None:
        base = pretrain(out_dir, spec, train_file, valid_file, pretrain_steps, None, vocab_size, seed, log, stage)[0]
    tok, valid, rows = load_tokenizer(base), data.read_jsonl(valid_file, task, limit=eval_limit), []
    for label, setting in settings.items():
        stage(f"{label}: LoRA r {setting['r']} (alpha {2 * setting['r']}) on {', '.join(targets)}")
        tracker = DirectionAndMagnitude(TRACKED) if label in ("lora", "dora") else None
        res = finetune(Path(base), out_dir / label, spec, train_file, valid_file, setting["r"], targets, lora_epochs,
                       lora_steps, seed, log, on_step=tracker,
                       **{k: v for k, v in setting.items() if k not in ("r", "variant")})
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
        length = merged.norm(dim=1) if layer.lora_magnitude_vector is None else layer.lora_magnitude_vector.float()
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/miniature.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/micro")
    p.add_argument("--task", default="marc-ja", help="built-in task (marc-ja, jnli) or a task JSON file")
    p.add_argument("--train-file", default=None, help="JSON lines of the task's rows; default: a fixed sample of "
                   "the task's own training data from the hub")
    p.add_argument("--valid-file", default=None, help="JSON lines; default: a fixed sample of its validation data")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="steps of 16 x 128 tokens")
    p.add_argument("--pretrain-minutes", type=float, default=None, help="also stop pretraining after this long")
    p.add_argument("--lora-epochs", type=float, default=3.0)
    p.add_argument("--lora-steps", type=int, default=None, help="stop LoRA after this many steps (a quick run)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--sweep-ranks", default=None, help="comma-separated LoRA ranks (e.g. 1,2,4,8,16,64): train and "
                   "evaluate one adapter per rank on one pretrained base instead of the before/after story")
    p.add_argument("--sweep-variants", default=None, help=f"comma-separated variants of {', '.join(VARIANTS)}: one "
                   "adapter each, at --lora-r or at each of --sweep-ranks, on one pretrained base")
    p.add_argument("--lora-r", type=int, default=16, help="the variant sweep's rank (alpha is 2r)")
    p.add_argument("--use-rslora", action="store_true", help="the rank sweep with rsLoRA's alpha / sqrt(r)")
    p.add_argument("--lora-targets", default=",".join(BLOCK_LINEARS), help=f"the sweep's targets, of {BLOCK_LINEARS}")
    p.add_argument("--base", default=None, help="the sweep's pretrained base (e.g. runs/micro/pretrain/model); "
                   "default: pretrain one first")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    try:
        if a.sweep_ranks or a.sweep_variants:
            sweep(a.out, sweep_settings(a), tuple(t.strip() for t in a.lora_targets.split(",")), a.base,
                  a.train_file, a.valid_file, a.task, a.pretrain_steps, a.lora_epochs, a.lora_steps, seed=a.seed)
        else:
            run(a.out, a.train_file, a.valid_file, a.task, a.pretrain_steps, a.pretrain_minutes, a.lora_epochs,
                a.lora_steps, seed=a.seed)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"experiments/miniature.py: error: {e}")


def sweep_settings(a) -> dict[str, dict]:
    """--sweep-ranks and/or --sweep-variants as {label: settings}: every variant at every rank."""
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
