"""minicalm: OpenCALM (GPT-NeoX) + hand-written LoRA fine-tuning in plain PyTorch."""
from .config import PRESETS, CalmConfig, get_preset
from .generate import decode_one_token, greedy_generate, prefill
from .lora import (LoRALinear, apply_lora, load_adapter, lora_disabled, merge_lora, save_adapter, save_merged,
                   trainable_parameters, trainable_summary, unmerge_lora)
from .model import CalmForCausalLM, KVCache
from .task import Task, load_task
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_model, save_checkpoint

__all__ = ["CalmConfig", "PRESETS", "get_preset", "CalmForCausalLM", "KVCache", "load_model", "save_checkpoint",
           "Tokenizer", "load_tokenizer", "Task", "load_task", "greedy_generate", "prefill", "decode_one_token",
           "LoRALinear", "apply_lora", "load_adapter", "save_adapter", "merge_lora", "unmerge_lora", "save_merged",
           "lora_disabled", "trainable_parameters", "trainable_summary"]
