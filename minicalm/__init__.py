"""minicalm: OpenCALM (GPT-NeoX) + LoRA fine-tuning in plain PyTorch."""
from .config import PRESETS, CalmConfig, get_preset
from .generate import decode_one_token, greedy_generate, prefill
from .model import CalmForCausalLM, KVCache
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_model, save_checkpoint

__all__ = ["CalmConfig", "PRESETS", "get_preset", "CalmForCausalLM", "KVCache", "load_model", "save_checkpoint",
           "Tokenizer", "load_tokenizer", "greedy_generate", "prefill", "decode_one_token"]
