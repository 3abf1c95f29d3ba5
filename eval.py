"""Reproduce the post's before/after table: `python eval.py --adapter runs/open-calm-7b-lora/adapter --compare-base`.

Only parses flags; the work is minicalm.evaluate.run_eval.
"""
import argparse
import sys

from minicalm.evaluate import EvalConfig, run_eval

D = EvalConfig()
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=D.model, help="hub id or local checkpoint folder; default: the base the --adapter "
               "records, else cyberagent/open-calm-7b")
p.add_argument("--revision", default=D.revision, help="hub branch, tag or commit; default: the one the --adapter "
               "records (for its base), else main")
p.add_argument("--adapter", default=D.adapter, help="LoRA adapter folder (PEFT format, e.g. RUN/adapter)")
p.add_argument("--task", default=D.task, help="built-in task (marc-ja, jnli) or a task JSON file; default: the "
               "task saved beside --adapter (task.json), else marc-ja")
p.add_argument("--data", default=D.data, help="JSON lines of the task's rows; default: its validation split from "
               "the hub")
p.add_argument("--limit", type=int, default=D.limit, help="evaluate only the first N rows")
p.add_argument("--batch-size", type=int, default=D.batch_size)
p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens)
p.add_argument("--max-len", type=int, default=D.max_len, help="prompt tokens; longer rows' text is truncated")
p.add_argument("--mode", choices=["generate", "likelihood", "both"], default=D.mode,
               help="greedy answers, label log-likelihood, or both")
p.add_argument("--out", default=D.out, help="folder for metrics.json, predictions.jsonl, report.md")
p.add_argument("--device", default=D.device)
p.add_argument("--dtype", default=D.dtype, choices=["auto", "bfloat16", "float16", "float32"])
p.add_argument("--quantize", choices=["nf4"], default=D.quantize, help="the base's block weights in 4-bit NF4")
p.add_argument("--compare-base", action="store_true", help="also evaluate the base model without the adapter")
try:
    run_eval(EvalConfig(**vars(p.parse_args())))
except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"eval.py: error: {e}")   # bad input: the message, not a traceback
