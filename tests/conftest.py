"""Shared fixtures: random tiny GPT-NeoX checkpoints written by transformers' save_pretrained (real files that
minicalm did not write), the real data and tokenizer under ../shared/, and how floats are compared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REVIEWS = SHARED / "data" / "amazon-ja-reviews"
NEOX_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"

torch.set_num_threads(1)


# How floats are compared. torch picks CPU kernels per instruction set (AVX-512, AVX2, plain; ATEN_CPU_CAPABILITY
# forces one) and their fp32 results differ in the last bits, as do two implementations of the same math or the same
# math on another batch shape. So fp32 results are compared relative to the size of what is compared: the largest
# error within FP32_REL of the largest |value|. Measured: at most 5e-7 of the scale (logits against transformers,
# batch 1 against batch 8, prefix reuse on and off) under all three kernel sets; 1e-5 leaves a 20x margin, while a
# real bug (a wrong rotary dim, mask, QKV split or position) moves logits by more than 1e-2 of their scale.
# Exact equality is claimed only where the same ops run on the same shapes (it then holds on every kernel set).
FP32_REL = 1e-5


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float = FP32_REL, msg: str = "") -> None:
    """max |got - want| <= rel * max |want| (shapes equal)."""
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = (got.double() - want.double()).abs().max().item(), want.double().abs().max().item()
    assert err <= rel * scale, f"{msg} largest error {err:.3g} exceeds {rel:g} of the scale {scale:.3g}"


def need(path: Path) -> Path:
    """A file under ../shared/; skip without it, except in CI (MINICALM_CI=1), where shared/ is always present and
    a skip would hide a failure."""
    if not path.exists():
        msg = f"{path} is absent (the shared/ folder lies beside the project in this workplace)"
        if os.environ.get("MINICALM_CI"):
            pytest.fail(msg + "; MINICALM_CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 500-token byte-level BPE trained on review text (+ the prompt, so its head is short) and a random tiny
    GPT-NeoX checkpoint folder (config.json, model.safetensors, tokenizer.json), built once per test module."""
    from minicalm import CalmConfig, CalmForCausalLM, save_checkpoint
    from minicalm.tasks.data import read_jsonl
    from minicalm.tasks.task import MARC_JA
    from minicalm.io.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("base")
    texts = [r.text for r in read_jsonl(need(REVIEWS / "train.jsonl"), limit=1000)]
    tok = train_tokenizer(texts + [MARC_JA.format({"sentence": ""})] * 500, root / "tok" / "tokenizer.json", 500)
    cfg = CalmConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256)
    folder = save_checkpoint(CalmForCausalLM(cfg).init_weights(seed=0), root / "base", tokenizer_dir=tok.path.parent)
    return folder, tok


@pytest.fixture(scope="session")
def standin_hub(tmp_path_factory):
    """The local stand-in for the hub (tests/hub.py) serving OpenCALM- and JGLUE-shaped repos, built once."""
    from hub import serve

    for path in (NEOX_TOKENIZER, REVIEWS / "train.jsonl", REVIEWS / "valid.jsonl"):
        need(path)
    hub = serve(tmp_path_factory.mktemp("standin_hub"))
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(standin_hub, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the stand-in with an empty cache (HF_HOME under tmp_path), and
    the stand-in's log emptied, so a test sees its own requests; returns the environment for subprocesses."""
    from hub import use_hub

    standin_hub.log.clear()
    return use_hub(monkeypatch, standin_hub, tmp_path / "hf_home")


# ----------------------------------------------------------------------------- many adapters, and serving them

def make_adapter(folder: Path, out: Path, cfg, seed: int, task=None, std: float = 0.1) -> Path:
    """A trained-looking adapter (random A and B, B not zero) for the checkpoint in `folder`, saved in PEFT's format,
    with its task.json (a minicalm Task) beside it as a training run writes it."""
    from minicalm import apply_lora, load_model
    from minicalm.io.adapter import save_adapter
    from minicalm.io.files import write_json

    model = apply_lora(load_model(folder), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    save_adapter(model, out, base=str(folder))
    if task is not None:
        write_json(out / "task.json", task.to_dict())
    return out


@pytest.fixture(scope="session")
def serving(tmp_path_factory):
    """What the serving tests run: a random GPT-NeoX checkpoint written by transformers with a 500-token BPE trained
    on review text (tokenizer.json in its folder), and three adapters of different ranks, scales and targets with
    their tasks: {"marc": MARC-ja's label words, "marc-rs": the same task with rsLoRA on the MLP, "alpaca": free-form
    answers, 24 tokens at most}. Weights at std 0.1 make logits peaked enough that greedy decoding meets no near-tie (the tests that
    compare tokens check the gaps they rely on). Returns (folder, tokenizer, {name: adapter folder})."""
    import shutil
    from dataclasses import replace

    from minicalm.config import LoraConfig
    from minicalm.io.tokenizer import train_tokenizer
    from minicalm.tasks.data import read_jsonl
    from minicalm.tasks.task import ALPACA, MARC_JA

    root = tmp_path_factory.mktemp("serving")
    texts = [r.text for r in read_jsonl(need(REVIEWS / "train.jsonl"), limit=1000)]
    tok = train_tokenizer(texts + [MARC_JA.format({"sentence": ""})] * 500, root / "tok" / "tokenizer.json", 500)
    folder, _ = hf_tiny(root, "base", seed=5, vocab_size=tok.vocab_size, initializer_range=0.1, eos_token_id=0,
                        max_position_embeddings=256)
    shutil.copy(tok.path, folder / "tokenizer.json")
    adapters = {
        "marc": (LoraConfig(r=4, alpha=8, targets=("query_key_value",)), MARC_JA),
        "marc-rs": (LoraConfig(r=8, alpha=4, targets=("dense", "dense_4h_to_h"), use_rslora=True), MARC_JA),
        "alpaca": (LoraConfig(r=2, alpha=16, targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
                   replace(ALPACA, max_new_tokens=24)),   # a budget that fits the 256 positions
    }
    dirs = {name: make_adapter(folder, root / name, cfg, seed, task) for seed, (name, (cfg, task)) in
            enumerate(adapters.items())}
    return folder, tok, dirs
