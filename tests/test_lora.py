"""LoRA: the math the docstrings claim, training touches only the adapters, merge/unmerge, PEFT-format files, and
parity with peft 0.21 over transformers (logits, gradients, adapters crossing both ways)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import FP32_REL, assert_close_to_scale, hf_tiny
from minicalm import load_model
from minicalm.io.adapter import load_adapter, save_adapter, save_merged
from minicalm.config import BLOCK_LINEARS
import minicalm
from minicalm.lora import LoRALinear, apply_lora, lora_config, lora_disabled, merge_lora, unmerge_lora
from minicalm.lora import trainable_parameters, trainable_summary

ALL = BLOCK_LINEARS
IDS = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 7], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize_adapters(model, seed=1, std=0.05):
    """B starts at zero, which would hide most bugs: give A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_unchanged(model, snap):
    state, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


# ----------------------------------------------------------------------------- LoRALinear and apply_lora

def test_lora_linear_matches_its_docstring():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, minicalm.LoraConfig(r=2, alpha=5, dropout=0.0))
    assert layer.scaling == 5 / 2
    assert layer.weight is base.weight and layer.bias is base.bias and not layer.weight.requires_grad
    assert layer.lora_A.weight.shape == (2, 8) and layer.lora_B.weight.shape == (6, 2)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert sorted(layer.state_dict()) == ["bias", "lora_A.weight", "lora_B.weight", "weight"]
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    W, b, A, B = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    by_hand = x @ W.T + b + layer.scaling * (x @ A.T @ B.T)
    assert_close_to_scale(layer(x), by_hand)
    layer.disabled = True
    assert torch.equal(layer(x), base(x))   # the same F.linear on the same tensors: exact on every kernel set


def test_fresh_lora_gives_the_base_logits(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    model = load_model(folder)
    base_keys = set(model.state_dict())
    with torch.no_grad():
        before = model(IDS)
    apply_lora(model, targets=ALL, r=4, alpha=8, dropout=0.05)
    with torch.no_grad():
        # B = 0 adds exact zeros, and eval mode carried over to the new dropouts: exact on every kernel set
        assert torch.equal(model(IDS), before)
    keys = set(model.state_dict())
    assert base_keys < keys   # base keys unchanged, e.g. ...query_key_value.weight
    assert "gpt_neox.layers.0.attention.query_key_value.lora_A.weight" in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys - base_keys)
    assert len(keys - base_keys) == 2 * 4 * 2   # A and B, four targets, two layers
    trainable, total = trainable_parameters(model)
    assert trainable == sum(p.numel() for k, p in model.named_parameters() if "lora_" in k)
    assert trainable_summary(model) == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                        f"trainable%: {100 * trainable / total:.4f}")
    assert lora_config(model) == minicalm.LoraConfig(r=4, alpha=8, dropout=0.05, targets=ALL, use_dora=False, use_rslora=False,
                                            init="default")   # read back from the layers


def test_dense_means_attention_dense_only(tiny_checkpoint):
    model = apply_lora(load_model(tiny_checkpoint[0]), targets=["dense"])
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"}
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="dense_h_to_4h"):   # the message lists the valid names
        apply_lora(load_model(tiny_checkpoint[0]), targets=("q_proj",))
    hidden = load_model(tiny_checkpoint[0]).config.hidden_size
    with pytest.warns(UserWarning, match=rf"r {hidden + 1} exceeds a target layer's smaller side \({hidden}\)"):
        apply_lora(load_model(tiny_checkpoint[0]), r=hidden + 1)


def test_only_adapters_train(tiny_checkpoint):
    model = load_model(tiny_checkpoint[0])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, targets=ALL, r=4, alpha=16, dropout=0.05).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        logits = model(IDS[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name
        opt.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())   # bit for bit
    assert all(p.abs().sum() > 0 for k, p in state.items() if k.endswith("lora_B.weight"))   # B did train
    assert all(p.dtype == torch.float32 for k, p in state.items() if "lora_" in k)


# ----------------------------------------------------------------------------- merge / unmerge

# Tolerances relative to the scale of the logits and of the weights compared. bf16: merged, W + B A is rounded to
# bf16 once; unmerged, W x and B A x are rounded separately (bf16 keeps 8 bits, 4e-3 per rounding): measured 1e-2
# of the logit scale, allow 3e-2. Unmerge rounds once more: measured 2e-3 of max|W|, allow 8e-3 (two bf16 steps).
# fp32: measured 4e-7 of the logit scale and 3e-8 of max|W|.
@pytest.mark.parametrize("dtype, logits_rel, weight_rel", [(torch.float32, FP32_REL, 1e-6),
                                                           (torch.bfloat16, 3e-2, 8e-3)])
def test_merge_unmerge(tiny_checkpoint, dtype, logits_rel, weight_rel):
    model = load_model(tiny_checkpoint[0], dtype=dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, targets=ALL, r=4, alpha=16)
    randomize_adapters(model)
    assert all(p.dtype == torch.float32 for k, p in model.named_parameters() if "lora_" in k)
    with torch.no_grad():
        with lora_disabled(model):
            assert torch.equal(model(IDS), load_model(tiny_checkpoint[0], dtype=dtype)(IDS))
        unmerged = model(IDS).float()
        merge_lora(model)
        once = {k: v.clone() for k, v in model.state_dict().items()}
        merged = model(IDS).float()
        model.eval()   # nothing happens behind the user's back
        merge_lora(model)   # idempotent
        assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
        with pytest.raises(RuntimeError, match="unmerge"), lora_disabled(model):
            model(IDS)
        unmerge_lora(model)
        unmerge_lora(model)
    assert_close_to_scale(merged, unmerged, logits_rel)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    state = model.state_dict()
    for k, v in base.items():   # only LoRA-wrapped weights moved, and they came back to within rounding
        if k.endswith(".weight"):
            assert_close_to_scale(state[k], v, weight_rel, k)
        else:
            assert torch.equal(state[k], v), k


def test_saved_merged_checkpoint_loads_in_transformers(tmp_path, tiny_checkpoint):
    from transformers import GPTNeoXForCausalLM

    model = apply_lora(load_model(tiny_checkpoint[0]), targets=ALL, r=4, alpha=16)
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(IDS)
        out = save_merged(model, tmp_path / "merged")
        assert_close_to_scale(model(IDS), expected)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        assert not any("lora_" in k for k in load_file(out / "model.safetensors"))
        hf = GPTNeoXForCausalLM.from_pretrained(out).eval()
        assert_close_to_scale(hf(IDS).logits, expected)
        assert torch.equal(load_model(out)(IDS), model(IDS))   # the same merged weights, the same ops


# ----------------------------------------------------------------------------- parity with peft

@pytest.mark.parametrize("targets", [("query_key_value",), ALL], ids=["qkv", "all"])
def test_peft_parity(tmp_path, targets):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
    from transformers import GPTNeoXForCausalLM

    folder, hf = hf_tiny(tmp_path)
    ours = apply_lora(load_model(folder), targets=targets, r=4, alpha=16, dropout=0.0)
    randomize_adapters(ours)

    # minicalm -> peft: same logits, and the saved keys are exactly the ones peft expects.
    save_adapter(ours, tmp_path / "ours", str(folder))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "ours", is_trainable=True)
    assert peft_model.peft_config["default"].lora_alpha == 16
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(tmp_path / "ours")))
    assert result.unexpected_keys == [] and not [k for k in result.missing_keys if "lora_" in k]
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = get_peft_model_state_dict(peft_model)
    assert saved.keys() == theirs.keys()
    assert all(torch.equal(saved[k], theirs[k]) for k in saved)
    with torch.no_grad():
        assert_close_to_scale(ours(IDS), peft_model(input_ids=IDS).logits)

    # One SGD step from the same state: the same adapter gradients and the same new adapter weights.
    ours.train(), peft_model.train()
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    opt_peft = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    labels = IDS[:, 1:].flatten()
    F.cross_entropy(ours(IDS[:, :-1]).flatten(0, 1), labels).backward()
    F.cross_entropy(peft_model(input_ids=IDS[:, :-1]).logits.flatten(0, 1), labels).backward()
    grads_peft = {k.replace(".default", ""): p.grad for k, p in peft_model.named_parameters() if p.requires_grad}
    grads_ours = {"base_model.model." + k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_peft.keys()
    for k in grads_ours:
        assert_close_to_scale(grads_ours[k], grads_peft[k], msg=k)
    opt_ours.step(), opt_peft.step()
    stepped = get_peft_model_state_dict(peft_model)
    for k, p in ours.named_parameters():
        if p.requires_grad:   # p - 0.1 grad: the step is far below max|p|, so the weights agree to FP32_REL
            assert_close_to_scale(p, stepped["base_model.model." + k], msg=k)

    # peft -> minicalm: an adapter saved by peft loads into a model with no LoRA yet.
    hf2 = GPTNeoXForCausalLM.from_pretrained(folder).eval()
    made = get_peft_model(hf2, LoraConfig(r=2, lora_alpha=8, lora_dropout=0.05, target_modules=list(targets),
                                          task_type="CAUSAL_LM"))
    randomize_adapters(made, seed=2)
    made.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(load_model(folder), tmp_path / "peft")
    assert lora_config(loaded) == minicalm.LoraConfig(r=2, alpha=8, dropout=0.05, targets=targets, use_dora=False,
                                             use_rslora=False, init="default")
    with torch.no_grad():
        assert_close_to_scale(loaded(IDS), made.eval()(input_ids=IDS).logits)


# ----------------------------------------------------------------------------- bad adapters

def test_load_into_a_model_that_has_matching_lora(tmp_path, tiny_checkpoint):
    src = apply_lora(load_model(tiny_checkpoint[0]), r=4, alpha=16)
    randomize_adapters(src)
    save_adapter(src, tmp_path / "a", None)
    dst = apply_lora(load_model(tiny_checkpoint[0]), r=4, alpha=16)
    load_adapter(dst, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(dst(IDS), src(IDS))
    merge_lora(dst)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(dst, tmp_path / "a")


def edit_adapter(src, dst, config=None, tensors=None):
    """Copy an adapter folder, changing its config fields and/or its tensors (a function of the dict)."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text()) | (config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(src / "adapter_model.safetensors")
    save_file(tensors(t) if tensors else t, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapters_change_nothing(tmp_path, tiny_checkpoint):
    folder = tiny_checkpoint[0]
    good = save_adapter(apply_lora(load_model(folder), r=4, alpha=16), tmp_path / "good", str(folder))
    other_folder, _ = hf_tiny(tmp_path, "other", hidden_size=32)
    wrong_shape = save_adapter(apply_lora(load_model(other_folder), r=4, alpha=16), tmp_path / "shape", None)
    module = "gpt_neox.layers.1.attention.query_key_value"
    key = f"base_model.model.{module}.lora_B.weight"
    edit = lambda name, config=None, tensors=None: edit_adapter(good, tmp_path / name, config, tensors)  # noqa: E731
    cases = {   # error message (regex) -> (adapter folder, rank of the LoRA already in the model or None)
        "r=4, alpha=16, targets=.'query_key_value'.; the model's LoRA has r=8": (good, 8),
        r"unexpected tensor .*query_key_value.lora_A.weight' \(targets \['dense'\]\)":
            (edit("t", {"target_modules": ["dense"]}), 4),
        "target_modules .'q_proj'.: unknown .'q_proj'.; the block's linear layers are query_key_value, dense":
            (edit("q", {"target_modules": ["q_proj"]}), None),
        r"query_key_value has A \(4, 32\) and B \(96, 4\); the model's layer is 192 x 64": (wrong_shape, None),
        f"{module} has only one of lora_A and lora_B":
            (edit("b", tensors=lambda t: {k: v for k, v in t.items() if k != key}), None),
        f"missing 1 adapted layers, e.g. '{module}'":
            (edit("m", tensors=lambda t: {k: v for k, v in t.items() if module not in k}), None),
        "unexpected tensor 'base_model.model.x.lora_A.weight'":
            (edit("u", tensors=lambda t: t | {"base_model.model.x.lora_A.weight": torch.zeros(1)}), None),
        "lora_bias": (edit("lb", {"lora_bias": True}), None),
        "query_key_value has no lora_magnitude_vector, but use_dora is True": (edit("d", {"use_dora": True}), None),
        "positive integer": (edit("r0", {"r": 0}), None),
    }
    for message, (adapter, lora_r) in cases.items():
        model = load_model(folder)
        if lora_r:
            apply_lora(model, r=lora_r, alpha=16)
        snap = snapshot(model)
        with pytest.raises(ValueError, match=message) as e:
            load_adapter(model, adapter)
        assert str(adapter) in str(e.value)   # the message names the file
        assert_unchanged(model, snap)
        assert any(isinstance(m, LoRALinear) for m in model.modules()) == bool(lora_r)


def test_base_model_name_mismatch_warns(tmp_path, tiny_checkpoint):
    src = apply_lora(load_model(tiny_checkpoint[0]), r=4)
    save_adapter(src, tmp_path / "a", "cyberagent/open-calm-7b")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "cyberagent/open-calm-7b"
    with pytest.warns(UserWarning, match="open-calm-7b.*open-calm-small"):
        load_adapter(load_model(tiny_checkpoint[0]), tmp_path / "a", base="cyberagent/open-calm-small")


def test_the_base_an_adapter_records_is_passed_not_carried(tmp_path, tiny_checkpoint):
    """A model carries no record of where it came from: save_adapter records the base it is told, and says when it
    is told none."""
    model = apply_lora(load_model(tiny_checkpoint[0]), r=4)
    assert not hasattr(model, "checkpoint")
    save_adapter(model, tmp_path / "told", str(tiny_checkpoint[0]), "main")
    told = json.loads((tmp_path / "told" / "adapter_config.json").read_text())
    assert (told["base_model_name_or_path"], told["revision"]) == (str(tiny_checkpoint[0]), "main")
    with pytest.warns(UserWarning, match=r"records no base model .* pass base="):
        save_adapter(model, tmp_path / "untold")


@pytest.mark.parametrize("peft_name, value", [("init_lora_weights", "pissa"), ("lora_alpha", 16),
                                               ("target_modules", ["dense"]), ("lora_dropout", 0.1)])
def test_apply_lora_answers_peft_s_spellings_with_minicalm_s(tiny_checkpoint, peft_name, value):
    """apply_lora's keywords are LoraConfig's (alpha, dropout, targets, init); PEFT's names, the documented call
    before the redesign, get one line naming them instead of a bare TypeError."""
    with pytest.raises(TypeError) as e:
        apply_lora(load_model(tiny_checkpoint[0]), r=4, **{peft_name: value})
    assert str(e.value) == (f"apply_lora: no setting {peft_name!r}; LoRA's settings are LoraConfig's: r, alpha, "
                            f"dropout, targets, use_dora, use_rslora, init")
