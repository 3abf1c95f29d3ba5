"""The machinery of files: the hub, checkpoints (safetensors and .bin), the tokenizer, adapters in PEFT's format."""
