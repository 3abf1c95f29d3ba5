"""LoRA-fine-tune OpenCALM on MARC-ja with the post's prompt (or any --task): `python train_lora.py --epochs 3 --lr 3e-4`.

Only parses flags (each a field of minicalm.train.TrainConfig; --help lists them) and calls minicalm.train.train.
Several GPUs: `torchrun --nproc-per-node N train_lora.py ...`.
"""
from minicalm.tools.cli import command
from minicalm.train import TrainConfig, train

if __name__ == "__main__":
    command(TrainConfig, train, "train_lora.py", __doc__)
