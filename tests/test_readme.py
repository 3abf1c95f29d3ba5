"""The README's LoRA recipe runs as written (on a tiny model, CPU, a few real reviews) and does what it says."""
import re

import torch
from conftest import REVIEWS, ROOT, need
from safetensors.torch import load_file

import minicalm
from minicalm import data
from minicalm.config import CalmConfig
from minicalm.model import CalmForCausalLM
from minicalm.tokenizer import train_tokenizer
from minicalm.weights import save_checkpoint


def test_readme_lora_recipe_runs(tmp_path, monkeypatch):
    reviews = data.read_jsonl(need(REVIEWS / "train.jsonl"), limit=16)
    tok = train_tokenizer([r.text for r in reviews] + [minicalm.task.MARC_JA.format({"sentence": ""})] * 50,
                          tmp_path / "tok" / "tokenizer.json", 400)
    cfg = CalmConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512)
    base = save_checkpoint(CalmForCausalLM(cfg).init_weights(seed=0), tmp_path / "base", tokenizer_dir=tok.path.parent)
    code = re.search(r"## LoRA in a dozen lines.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    setting = 'MODEL, DATA, DEVICE = "cyberagent/open-calm-7b", "train.jsonl", "cuda"'
    assert setting in code
    code = code.replace(setting, f'MODEL, DATA, DEVICE = {str(base)!r}, {str(REVIEWS / "train.jsonl")!r}, "cpu"')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "read_jsonl", lambda path, task=None, limit=None: reviews)   # 16 reviews keep it seconds long
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)

    # 4. the adapter is trained and in PEFT's key layout; 5. the merged folder is a plain checkpoint
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.gpt_neox.layers.") for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    merged = minicalm.load_model(tmp_path / "merged", dtype=torch.bfloat16)
    x = torch.randint(0, tok.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(merged(x), scope["model"].eval()(x))
