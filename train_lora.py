"""LoRA-fine-tune OpenCALM on MARC-ja with the post's prompt (or any --task): `python train_lora.py --epochs 3 --lr 3e-4`.

Only parses flags (each a field of minicalm.train.TrainConfig; --help lists them) and calls minicalm.train.train.
Several GPUs: `torchrun --nproc-per-node N train_lora.py ...`. Exit status: 0 when the run is done (or stopped by
--max-time), 1 for bad input or a run that failed, 130 after Ctrl-C and 143 after SIGTERM, each once the checkpoint
is saved, so that `train_lora.py ... && eval.py ...` does not evaluate a half-trained adapter.
"""
import sys

from minicalm.tools.cli import command
from minicalm.train import TrainConfig, train

if __name__ == "__main__":
    summary = command(TrainConfig, train, "train_lora.py", __doc__)
    if summary["stopped"] in ("SIGINT", "SIGTERM"):   # saved, not done: 128 + the signal's number, as shells say
        sys.exit({"SIGINT": 130, "SIGTERM": 143}[summary["stopped"]])
