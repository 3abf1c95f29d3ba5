"""Reproduce the post's before/after table: `python eval.py --adapter runs/open-calm-7b-lora/adapter --compare-base`.

Only parses flags (each a field of minicalm.tools.evaluate.EvalConfig; --help lists them) and calls the library:
one task (minicalm.tools.evaluate.run_eval), or with --suite every task of a suite (minicalm.tools.suite.run_suite).
"""
from minicalm.tools.cli import command
from minicalm.tools.evaluate import EvalConfig
from minicalm.tools.suite import eval_main

if __name__ == "__main__":
    command(EvalConfig, eval_main, "eval.py", __doc__)
