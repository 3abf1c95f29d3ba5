"""CalmConfig: the OpenCALM presets match the checkpoints' config.json files on the hub, both rotary spellings are
read, bad configs are refused."""
from __future__ import annotations

import json
import re

import pytest
import torch

from minicalm import PRESETS, CalmConfig, CalmForCausalLM, get_preset, load_model
from minicalm.lora import trainable_parameters

# The hub's config.json of each cyberagent/open-calm-* (and the model cards' sizes): hidden, layers, heads, head dim,
# intermediate, vocab rows, params.
OPENCALM = {
    "open-calm-small": (768, 12, 12, 64, 3072, 52096, 165e6),
    "open-calm-medium": (1024, 24, 16, 64, 4096, 52096, 409e6),
    "open-calm-large": (1536, 24, 16, 96, 6144, 52096, 840e6),
    "open-calm-1b": (2048, 24, 16, 128, 8192, 52096, 1.42e9),
    "open-calm-3b": (2560, 32, 32, 80, 10240, 52224, 2.79e9),
    "open-calm-7b": (4096, 32, 32, 128, 16384, 52224, 6.87e9),
}

# A 2023-style config.json as OpenCALM's `main` holds it (the 1b/7b head size, shrunk).
LEGACY = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
          "hidden_size": 256, "initializer_range": 0.02, "intermediate_size": 1024, "layer_norm_eps": 1e-05,
          "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 2,
          "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 1.0, "tie_word_embeddings": False,
          "torch_dtype": "float16", "transformers_version": "4.27.0.dev0", "use_cache": True,
          "use_parallel_residual": False, "vocab_size": 128}


@pytest.mark.parametrize("name", list(OPENCALM))
def test_presets_match_the_opencalm_table(name):
    hidden, layers, heads, hs, inter, vocab, params = OPENCALM[name]
    cfg = get_preset(f"cyberagent/{name}")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size,
            cfg.intermediate_size, cfg.vocab_size) == (hidden, layers, heads, hs, inter, vocab)
    # settings the table says are the same in all six
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.max_position_embeddings, cfg.use_parallel_residual,
            cfg.layer_norm_eps, cfg.hidden_act, cfg.tie_word_embeddings, cfg.bos_token_id, cfg.eos_token_id) == \
        (1.0, 10000.0, 2048, False, 1e-5, "gelu", False, 0, 0)
    with torch.device("meta"):   # no memory: shapes only
        n = trainable_parameters(CalmForCausalLM(cfg))[1]
    assert abs(n - params) / params < 0.02, f"{name}: {n / 1e6:.0f}M parameters, the table says {params / 1e6:.0f}M"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="open-calm-7b"):
        get_preset("open-calm-13b")
    assert "tiny" in PRESETS


def test_legacy_spelling_is_read():
    cfg = CalmConfig.from_dict(LEGACY | {"rotary_pct": 0.5, "rotary_emb_base": 500})
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.rotary_ndims, cfg.use_parallel_residual) == (0.5, 500.0, 64, False)


def test_rope_parameters_are_read():
    d = {k: v for k, v in LEGACY.items() if not k.startswith("rotary")}
    d["rope_parameters"] = {"partial_rotary_factor": 0.25, "rope_theta": 20000.0, "rope_type": "default"}
    cfg = CalmConfig.from_dict(d)
    assert (cfg.rotary_pct, cfg.rotary_emb_base, cfg.rotary_ndims) == (0.25, 20000.0, 32)
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        CalmConfig.from_dict(d | {"rope_parameters": {"rope_type": "linear", "factor": 2.0}})


def test_missing_rotary_pct_means_a_quarter_like_transformers():
    from transformers import GPTNeoXConfig

    d = {k: v for k, v in LEGACY.items() if not k.startswith("rotary")}
    assert CalmConfig.from_dict(d).rotary_pct == 0.25
    assert GPTNeoXConfig.from_dict(d).rope_parameters["partial_rotary_factor"] == 0.25   # the oracle agrees
    # and a missing use_parallel_residual means True in both
    d.pop("use_parallel_residual")
    assert CalmConfig.from_dict(d).use_parallel_residual is GPTNeoXConfig.from_dict(d).use_parallel_residual is True


def test_to_dict_round_trips_and_writes_both_spellings():
    cfg = CalmConfig.from_dict(LEGACY | {"rotary_pct": 0.25})
    d = cfg.to_dict()
    assert d["rotary_pct"] == d["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert CalmConfig.from_dict(d) == cfg


@pytest.mark.parametrize("edit, words", [
    ({"model_type": "llama"}, ["model_type is 'llama'", "gpt_neox"]),
    ({"hidden_act": "relu"}, ["'relu'", "GELU"]),
    ({"hidden_size": 255}, ["not divisible"]),
])
def test_bad_config_is_refused_naming_the_file(tmp_path, edit, words):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LEGACY | edit))
    for load in (lambda: CalmConfig.from_json(folder / "config.json"), lambda: load_model(folder)):
        with pytest.raises(ValueError) as e:
            load()
        assert str(folder / "config.json") in str(e.value)
        for w in words:
            assert w in str(e.value)


def test_missing_field_and_bad_json_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in LEGACY.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: missing required field 'vocab_size'")):
        CalmConfig.from_json(path)
    path.write_text('{"model_type": "gpt_neox",')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON")):
        CalmConfig.from_json(path)
