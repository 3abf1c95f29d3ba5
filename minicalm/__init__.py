"""minicalm: OpenCALM (GPT-NeoX) + hand-written LoRA fine-tuning in plain PyTorch.

The lesson, in the order it runs: config -> model -> lora -> multi_lora -> variants -> nf4 -> loss -> generate ->
engine -> train. The machinery it stands on: io/ (the hub, checkpoint and adapter files, the tokenizer), tasks/
(prompts, data, the answer rule and its metrics), tools/ (evaluation and its report, the memory planner, pictures, the
adapter inspector, the commands, the server and a run's bookkeeping).

The public API, by the module that defines it. A name is imported from its module on first use (PEP 562), so that
`python -m minicalm.generate` runs its module once, not once more as a package import.
"""
import importlib

from .tools.moved import install

API = {
    "config": ["CalmConfig", "LoraConfig", "PRESETS", "get_preset"],
    "model": ["CalmForCausalLM", "KVCache"],
    "lora": ["LoRALinear", "DoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_disabled", "lora_config",
             "trainable_parameters", "trainable_summary"],
    "multi_lora": ["MultiLoRALinear", "add_adapters", "row_adapters"],
    "generate": ["greedy_generate", "prefill", "decode_one_token", "decode_n_tokens", "score_continuations"],
    "engine": ["Engine", "Request"],
    "train": ["TrainConfig", "train"],
    "io.weights": ["load_model", "save_checkpoint"],
    "io.tokenizer": ["Tokenizer", "load_tokenizer"],
    "io.adapter": ["load_adapter", "load_adapters", "save_adapter", "save_merged"],
    "tasks.task": ["Task", "load_task"],
}
WHERE = {name: module for module, names in API.items() for name in names}
__all__ = list(WHERE)
install()   # old module paths (minicalm.adapter, minicalm.data, ...) lead to where they went


def __getattr__(name: str):
    if name not in WHERE:
        raise AttributeError(f"module 'minicalm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minicalm.{WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
