"""Shared fixtures: random tiny GPT-NeoX checkpoints written by transformers' save_pretrained (real files that
minicalm did not write), and the real data and tokenizer under ../shared/."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REVIEWS = SHARED / "data" / "amazon-ja-reviews"
NEOX_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"

torch.set_num_threads(1)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared/ folder lies beside the project in this workplace)")
    return path


def hf_tiny(tmp_path: Path, name: str = "hf", seed: int = 0, max_shard_size=None, **overrides):
    """Save a random transformers GPTNeoXForCausalLM to tmp_path/name; returns (folder, hf_model)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               rotary_pct=1.0, rotary_emb_base=10000, use_parallel_residual=False, max_position_embeddings=256,
               bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)).eval()
    folder = tmp_path / name
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kw)
    return folder, model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random tiny OpenCALM-shaped (sequential residual, full rotary) checkpoint and its transformers model."""
    return hf_tiny(tmp_path)
