"""Reproduce the post's before/after table: `python eval.py --adapter runs/open-calm-7b-lora/adapter --compare-base`.

Only parses flags (each a field of minicalm.tools.evaluate.EvalConfig; --help lists them) and calls run_eval.
"""
from minicalm.tools.cli import command
from minicalm.tools.evaluate import EvalConfig, run_eval

if __name__ == "__main__":
    command(EvalConfig, run_eval, "eval.py", __doc__)
