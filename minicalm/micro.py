"""The whole experiment in miniature, on a laptop CPU: `python -m minicalm.micro --out runs/micro`.

1. train a 4,000-token byte-level BPE (OpenCALM's special ids) on the task's training text;
2. pretrain a tiny GPT-NeoX from random weights on that raw text (a plain causal LM, every parameter);
3. save it as an ordinary checkpoint folder (config.json, model.safetensors, tokenizer.json);
4. evaluate it with the task's prompt (greedy answers and label likelihood);
5. LoRA-fine-tune it through the same code path as train_lora.py;
6. evaluate again and print the before/after table (beside the post's, for marc-ja).
Everything runs through minicalm's own train() and evaluate_rows(); nothing here re-implements them. Data: the
task's own (for marc-ja a fixed 10,000 / 1,000-row sample of MARC-ja from the hub, cached), or --train-file and
--valid-file, which is how it runs offline.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import data
from .config import CalmConfig
from .evaluate import evaluate_rows, table
from .lora import load_adapter
from .model import CalmForCausalLM
from .progress import fmt_time
from .task import MARC_JA, load_task
from .tokenizer import train_tokenizer
from .train import TrainConfig, train
from .weights import load_model, save_checkpoint

SAMPLE = {"train": 10_000, "validation": 1_000}   # rows of the task's own data the miniature uses by default


def micro_config(vocab_size: int) -> CalmConfig:
    """3 layers, hidden 128, 4 heads, OpenCALM's layout (sequential residual, full rotary): ~1.5M parameters."""
    return CalmConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=512, max_position_embeddings=512)


def task_files(task, train_file: str | None, valid_file: str | None) -> tuple[str, str]:
    """The given files, or a fixed sample of the task's own data; one clear line when neither is there."""
    if train_file and valid_file:
        return train_file, valid_file
    try:
        return tuple(str(data.task_data(task, split, subset=SAMPLE[split])) for split in ("train", "validation"))
    except (FileNotFoundError, ImportError) as e:
        raise FileNotFoundError(f"the miniature needs task {task.name}'s data and could not get it ({e}); pass "
                                f"--train-file and --valid-file (JSON lines; in this repository's workplace "
                                f"../shared/data/amazon-ja-reviews/train.jsonl and valid.jsonl)") from None


def run(out: str, train_file: str | None = None, valid_file: str | None = None, task: str = "marc-ja",
        pretrain_steps: int = 3000, pretrain_minutes: float | None = None, lora_epochs: float = 3.0,
        lora_steps: int | None = None, eval_limit: int | None = None, vocab_size: int = 4000, seed: int = 1337,
        log: bool = True) -> dict:
    t0 = time.time()
    spec = task
    task = load_task(spec)
    train_file, valid_file = task_files(task, train_file, valid_file)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = lambda msg: log and print(f"\n[{fmt_time(time.time() - t0)}] {msg}", file=sys.stderr, flush=True)

    stage(f"1/6 tokenizer: byte-level BPE, {vocab_size} tokens, on {train_file}")
    texts = [r.text for r in data.read_jsonl(train_file, task)]
    # The prompt's English header is ordinary text for OpenCALM's tokenizer; let ours know it too.
    empty = task.format({f: "" for f in task.fields})
    tok = train_tokenizer(texts + [empty] * 100, out_dir / "tokenizer" / "tokenizer.json", vocab_size)

    stage("2/6 pretraining a tiny GPT-NeoX from random weights on the raw reviews")
    init = out_dir / "init"
    save_checkpoint(CalmForCausalLM(micro_config(tok.vocab_size)).init_weights(seed=seed), init,
                    tokenizer_dir=tok.path.parent)
    pre = train(TrainConfig(
        model=str(init), task=str(spec), train_file=train_file, valid_file=valid_file, out=str(out_dir / "pretrain"), full=True,
        text=True, max_len=128, batch_size=16, micro_batch_size=16, lr=2e-3, weight_decay=0.1,
        warmup_steps=min(100, max(1, pretrain_steps // 10)), max_steps=pretrain_steps,
        max_time=pretrain_minutes and pretrain_minutes * 60,
        eval_every=0, eval_limit=200, save_every=0, device="cpu", seed=seed, log=log, resume=False))
    base = out_dir / "pretrain" / "model"   # 3. an ordinary checkpoint folder, written by train()

    valid = data.read_jsonl(valid_file, task, limit=eval_limit)
    kw = dict(max_len=256, batch_size=32, mode="both", log=log)
    stage(f"4/6 evaluating the pretrained model on {len(valid)} rows with the task's prompt")
    model = load_model(base)
    before = evaluate_rows(model, tok, valid, task, **kw)

    stage("5/6 LoRA fine-tuning (r 16, alpha 32, all four linear layers) with the train_lora.py code path")
    lora = train(TrainConfig(
        model=str(base), task=str(spec), train_file=train_file, valid_file=valid_file, out=str(out_dir / "lora"), epochs=lora_epochs,
        max_steps=lora_steps, lr=5e-4, batch_size=16, micro_batch_size=16, max_len=256,
        warmup_steps=50 if lora_steps is None else max(1, lora_steps // 10),
        lora_r=16, lora_alpha=32, lora_dropout=0.05,
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        eval_every=0, eval_limit=200, save_every=0, device="cpu", seed=seed, log=log))

    stage("6/6 evaluating base + adapter")
    load_adapter(model, out_dir / "lora" / "adapter")   # onto the same base model evaluated before
    after = evaluate_rows(model, tok, valid, task, **kw)

    seconds = time.time() - t0
    res = {"seconds": round(seconds, 1), "pretrain": {k: pre[k] for k in ("step", "loss", "val_loss", "seconds")},
           "lora": {k: lora[k] for k in ("step", "loss", "val_loss", "seconds")},
           "before": before["metrics"], "after": after["metrics"], "n_valid": len(valid), "task": task.name}
    (out_dir / "results.json").write_text(json.dumps(res, indent=2))
    report = format_report(res)
    (out_dir / "report.md").write_text(report, encoding="utf-8")
    if log:
        print("\n" + report)
    return res


def format_report(res: dict) -> str:
    b, a = res["before"], res["after"]
    rows = [("micro GPT-NeoX (1.6M params) before LoRA", b), ("micro GPT-NeoX + LoRA", a)]
    lik = lambda m: f"{100 * m['likelihood']['accuracy']:.1f}%"
    g = b["generate"]
    return "\n".join([
        f"Miniature on {res['n_valid']} held-out rows of task {res['task']} (greedy answers to its prompt):", "",
        table(rows, post=res["task"] == MARC_JA.name), "",
        f"Label-likelihood accuracy: before {lik(b)}, after {lik(a)}. Majority class ({g['majority_label']}): "
        f"{100 * g['majority_baseline']:.1f}%.",
        f"Pretraining: {res['pretrain']['step']} steps, loss {res['pretrain']['loss']:.3f}; LoRA: "
        f"{res['lora']['step']} steps, answer loss {res['lora']['loss']:.4f}. Total {fmt_time(res['seconds'])}.", ""])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minicalm.micro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/micro")
    p.add_argument("--task", default="marc-ja", help="built-in task (marc-ja, jnli) or a task JSON file")
    p.add_argument("--train-file", default=None, help="JSON lines of the task's rows; default: a fixed sample of "
                   "the task's own training data from the hub")
    p.add_argument("--valid-file", default=None, help="JSON lines; default: a fixed sample of its validation data")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="steps of 16 x 128 tokens")
    p.add_argument("--pretrain-minutes", type=float, default=None, help="also stop pretraining after this long")
    p.add_argument("--lora-epochs", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args(argv)
    try:
        run(a.out, a.train_file, a.valid_file, a.task, a.pretrain_steps, a.pretrain_minutes, a.lora_epochs,
            seed=a.seed)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"python -m minicalm.micro: error: {e}")


if __name__ == "__main__":
    main()
