"""minicalm: OpenCALM (GPT-NeoX) + hand-written LoRA fine-tuning in plain PyTorch.

The public API, by the module that defines it. A name is imported from its module on first use (PEP 562), so that
`python -m minicalm.generate` (and the other commands) run their module once, not once more as a package import.
"""
import importlib

API = {
    "config": ["CalmConfig", "PRESETS", "get_preset"],
    "model": ["CalmForCausalLM", "KVCache"],
    "weights": ["load_model", "save_checkpoint"],
    "tokenizer": ["Tokenizer", "load_tokenizer"],
    "task": ["Task", "load_task"],
    "generate": ["greedy_generate", "prefill", "decode_one_token", "decode_n_tokens"],
    "lora": ["LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_disabled"],
    "adapter": ["load_adapter", "save_adapter", "save_merged"],
    "nf4": ["trainable_parameters", "trainable_summary"],
}
WHERE = {name: module for module, names in API.items() for name in names}
__all__ = list(WHERE)


def __getattr__(name: str):
    if name not in WHERE:
        raise AttributeError(f"module 'minicalm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minicalm.{WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
