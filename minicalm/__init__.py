"""minicalm: OpenCALM (GPT-NeoX) + hand-written LoRA fine-tuning in plain PyTorch.

The lesson, in the order it runs: config -> model -> lora -> multi_lora -> variants -> nf4 -> loss -> generate ->
engine -> train. The machinery it stands on: io/ (the hub, checkpoint and adapter files, the tokenizer), tasks/
(prompts, data, the answer rule and its metrics), tools/ (evaluation and its report, the memory planner, pictures, the
adapter inspector, the commands, the server and a run's bookkeeping). The public API:
"""
import sys

from .config import PRESETS, CalmConfig, LoraConfig, TrainConfig, get_preset
from .model import CalmForCausalLM, KVCache
from .lora import (DoRALinear, LoRALinear, apply_lora, lora_config, lora_disabled, merge_lora, trainable_parameters,
                   trainable_summary, unmerge_lora)
from .multi_lora import MultiLoRALinear, add_adapters, row_adapters
from .generate import decode_n_tokens, decode_one_token, greedy_generate, prefill, score_continuations
from .engine import Engine, Request
from .train import train
from .io.weights import load_model, save_checkpoint
from .io.tokenizer import Tokenizer, load_tokenizer
from .io.adapter import load_adapter, load_adapters, save_adapter, save_merged
from .tasks.task import Task, load_task
from .tools.evaluate import evaluate_rows

__all__ = ["CalmConfig", "LoraConfig", "TrainConfig", "PRESETS", "get_preset", "CalmForCausalLM", "KVCache", "LoRALinear",
           "DoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_disabled", "lora_config",
           "trainable_parameters", "trainable_summary", "MultiLoRALinear", "add_adapters", "row_adapters",
           "greedy_generate", "prefill", "decode_one_token", "decode_n_tokens", "score_continuations", "Engine",
           "Request", "train", "load_model", "save_checkpoint", "Tokenizer", "load_tokenizer", "load_adapter",
           "load_adapters", "save_adapter", "save_merged", "Task", "load_task", "evaluate_rows"]

if sys.argv[:1] == ["-m"]:   # `python -m minicalm.X` is being looked for: an old module's path says where it went
    from .tools.moved import install
    install()
