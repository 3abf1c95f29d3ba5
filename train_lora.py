"""LoRA-fine-tune OpenCALM on MARC-ja with the post's prompt (or any --task): `python train_lora.py --epochs 3 --lr 3e-4`.

Only parses flags; the loop is minicalm.train.train. Several GPUs: `torchrun --nproc-per-node N train_lora.py ...`.
"""
import argparse
import sys

from minicalm.train import TrainConfig, train

D = TrainConfig()
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=D.model, help="hub id (cyberagent/open-calm-small ... -7b) or local folder")
p.add_argument("--revision", default=D.revision, help="hub branch, tag or commit (e.g. refs/pr/5 for 7b safetensors); "
               "recorded in the adapter, so evaluation loads the same one")
p.add_argument("--task", default=D.task, help="built-in task (marc-ja, jnli) or a task JSON file: prompt, label words")
p.add_argument("--train-file", default=D.train_file, help="JSON lines of the task's rows; default: its train split "
               "from the hub")
p.add_argument("--valid-file", default=D.valid_file, help="JSON lines; default: the task's validation split; 'none' "
               "skips validation")
p.add_argument("--out", default=D.out, help="run folder: adapter/, state.pt, metrics.jsonl, train_config.json")
p.add_argument("--epochs", type=float, default=D.epochs)
p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate")
p.add_argument("--batch-size", type=int, default=D.batch_size, help="examples per optimizer step (all GPUs)")
p.add_argument("--micro-batch-size", type=int, default=D.micro_batch_size, help="examples per forward on one GPU")
p.add_argument("--max-len", type=int, default=D.max_len, help="tokens per example; longer rows' text is truncated")
p.add_argument("--lora-r", type=int, default=D.lora_r)
p.add_argument("--lora-alpha", type=float, default=D.lora_alpha)
p.add_argument("--lora-dropout", type=float, default=D.lora_dropout)
p.add_argument("--lora-targets", default=",".join(D.lora_targets),
               help="comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h")
p.add_argument("--use-dora", action="store_true", help="DoRA: a learned magnitude per output row, LoRA for the "
               "direction (variants.py)")
p.add_argument("--use-rslora", action="store_true", help="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r")
p.add_argument("--lora-init", default=D.lora_init, help="A and B from: default (Kaiming A, zero B), gaussian, pissa "
               "(the weight's top singular directions), pissa_niter_K (randomized SVD), olora (its QR)")
p.add_argument("--loraplus-lr-ratio", type=float, default=D.loraplus_lr_ratio, help="LoRA+: B (and DoRA's m) "
               "learn at lr x this ratio, A at lr (e.g. 16)")
p.add_argument("--quantize", choices=["nf4"], default=D.quantize, help="QLoRA: the base's block weights in 4-bit "
               "NormalFloat, dequantized on the fly (about a third of bf16's memory)")
p.add_argument("--warmup-steps", type=int, default=D.warmup_steps)
p.add_argument("--schedule", choices=["cosine", "linear"], default=D.schedule, help="decay after warmup")
p.add_argument("--weight-decay", type=float, default=D.weight_decay)
p.add_argument("--grad-clip", type=float, default=D.grad_clip, help="max gradient norm (0: off)")
p.add_argument("--eval-every", type=int, default=D.eval_every, help="steps between validation losses")
p.add_argument("--eval-limit", type=int, default=D.eval_limit, help="validation rows for the loss")
p.add_argument("--eval-accuracy", type=int, default=D.eval_accuracy, help="validation rows for greedy accuracy")
p.add_argument("--save-every", type=int, default=D.save_every, help="steps between checkpoints")
p.add_argument("--max-steps", type=int, default=D.max_steps, help="stop after N steps (overrides --epochs)")
p.add_argument("--max-time", type=float, default=D.max_time, help="stop and save after this many seconds")
p.add_argument("--limit-train", type=int, default=D.limit_train, help="use only the first N training rows")
p.add_argument("--seed", type=int, default=D.seed)
p.add_argument("--device", default=D.device)
p.add_argument("--dtype", default=D.dtype, choices=["auto", "bfloat16", "float16", "float32"],
               help="the base's dtype; float16 (GPUs without bf16: T4, V100) trains with a dynamic loss scale")
p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
p.add_argument("--train-on-inputs", action="store_true", help="loss on the whole prompt, not only the answer")
p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in backward to save memory")
p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
               help="run every row in full instead of computing the prompt head the rows share once per micro-batch "
                    "(same loss and gradients; with LoRA dropout the head's masks are then drawn per row)")
p.add_argument("--compile", action="store_true", help="torch.compile each block (GPU runs; slow to start)")
a = p.parse_args()
a.lora_targets = tuple(t.strip() for t in a.lora_targets.split(",") if t.strip())
try:
    train(TrainConfig(**vars(a)))
except (ValueError, FileNotFoundError, FileExistsError, ImportError, MemoryError, FloatingPointError) as e:
    sys.exit(f"train_lora.py: error: {e}")   # bad input or a stopped run: the message, not a traceback
