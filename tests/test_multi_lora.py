"""Many adapters in one batch (minicalm/multi_lora.py) against peft's mixed batches (`adapter_names=[...]`, "__base__"
for the base): three adapters of different ranks, scales (one rsLoRA) and targets and the base, in one batch, give
peft's logits and greedy tokens; the update is the docstring's formula; DoRA and a second set of adapters are refused
with the model untouched."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_scale, hf_tiny, make_adapter
from minicalm import greedy_generate, load_model, lora_disabled
from minicalm.config import LoraConfig
from minicalm.io.adapter import load_adapter, load_adapters
from minicalm.multi_lora import MultiLoRALinear, add_adapters, multi_lora_layers, row_adapters

ADAPTERS = {   # different ranks, scales and targets: what a server meets
    "qkv4": LoraConfig(r=4, alpha=8, targets=("query_key_value",)),
    "mlp8rs": LoraConfig(r=8, alpha=4, targets=("dense", "dense_4h_to_h"), use_rslora=True),
    "all2": LoraConfig(r=2, alpha=16, targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, transformers model, {name: adapter folder})."""
    tmp = tmp_path_factory.mktemp("multi")
    folder, hf = hf_tiny(tmp, seed=4)
    dirs = {name: make_adapter(folder, tmp / name, cfg, seed) for seed, (name, cfg) in enumerate(ADAPTERS.items())}
    return folder, hf, dirs


def peft_mixed(hf, dirs):
    from peft import PeftModel

    names = list(dirs)
    peft = PeftModel.from_pretrained(hf, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(dirs[name], adapter_name=name)
    return peft.eval()


ROWS = ["qkv4", "__base__", "mlp8rs", "all2", "all2", "__base__", "qkv4", "mlp8rs"]


def test_a_mixed_batch_gives_peft_s_logits(setup):
    folder, hf, dirs = setup
    ours = load_model(folder)
    names = load_adapters(ours, dirs)
    rows = torch.tensor([0 if n == "__base__" else names.index(n) + 1 for n in ROWS])
    x = torch.randint(2, 128, (len(ROWS), 12), generator=torch.Generator().manual_seed(0))
    peft = peft_mixed(hf, dirs)
    with torch.no_grad(), row_adapters(ours, rows):
        got = ours(x)
    with torch.no_grad():
        want = peft(input_ids=x, adapter_names=ROWS).logits
    err = (got - want).abs().max() / want.abs().max()
    print(f"largest logit error against peft's mixed batch: {err:.2e} of the scale")
    assert_close_to_scale(got, want, rel=1e-4)
    # each adapter changed its rows (the comparison is not of base against base), and the base rows are the base
    with torch.no_grad(), lora_disabled(ours):
        plain = ours(x)
    for i, n in enumerate(ROWS):
        assert (n == "__base__") == torch.equal(got[i], plain[i]), n


def test_a_mixed_batch_decodes_peft_s_greedy_tokens(setup):
    """Left-padded prompts of different lengths, each row on its own adapter, 12 greedy tokens: the same tokens as
    peft's generate(adapter_names=...). The prompts' greedy steps have no near-tie (checked), so the few last bits
    in which two implementations differ cannot flip a token."""
    folder, hf, dirs = setup
    ours = load_model(folder)
    names = load_adapters(ours, dirs)
    rows = ["all2", "qkv4", "__base__", "mlp8rs"]
    g = torch.Generator().manual_seed(1)
    lengths = [9, 3, 14, 6]
    x = torch.full((4, 14), 1)
    mask = torch.zeros(4, 14, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, 14 - n:] = torch.randint(2, 128, (n,), generator=g)
        mask[i, 14 - n:] = 1
    index = torch.tensor([0 if n == "__base__" else names.index(n) + 1 for n in rows])
    with row_adapters(ours, index):
        got = greedy_generate(ours, x, 12, eos_token_id=None, attention_mask=mask, pad_token_id=1)
    with torch.no_grad():
        want = peft_mixed(hf, dirs).generate(input_ids=x, attention_mask=mask, adapter_names=rows, max_new_tokens=12,
                                             do_sample=False, pad_token_id=1, eos_token_id=None)
    assert torch.equal(got, want)
    assert len({tuple(r[-12:].tolist()) for r in got}) == 4   # four different answers


def test_the_update_is_the_docstring_s_formula_and_one_adapter_is_lora_linear_s(setup):
    """A row on adapter a gets W x + b + s B A x: what LoRALinear gives with that adapter alone (to rounding)."""
    folder, _, dirs = setup
    multi = load_model(folder)
    names = load_adapters(multi, dirs)
    x = torch.randint(2, 128, (3, 10), generator=torch.Generator().manual_seed(2))
    for name in names:
        single = load_adapter(load_model(folder), dirs[name])
        with torch.no_grad(), row_adapters(multi, torch.full((3,), names.index(name) + 1)):
            assert_close_to_scale(multi(x), single(x), msg=name)
    layer = multi.gpt_neox.layers[0].attention.query_key_value
    assert isinstance(layer, MultiLoRALinear) and layer.A.shape == (4, 8, 64) and layer.B.shape == (4, 192, 8)
    assert not layer.A[0].any() and not layer.B[0].any()                    # 0: the base
    assert not layer.A[1, 4:].any() and not layer.B[1, :, 4:].any()        # r 4 padded to 8 with zeros
    assert not layer.A[2].any()                                             # mlp8rs leaves query_key_value alone
    assert len(multi_lora_layers(multi)) == 2 * 4                           # the union of the targets, per block


def test_dora_and_a_second_set_are_refused_and_the_model_is_untouched(setup, tmp_path):
    folder, _, dirs = setup
    dora = make_adapter(folder, tmp_path / "dora", LoraConfig(r=4, use_dora=True), seed=9)
    model = load_model(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^adapter d: DoRA cannot share a batch with other adapters .* merge it"):
        load_adapters(model, {"a": dirs["qkv4"], "d": dora})
    assert not multi_lora_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    load_adapters(model, {"a": dirs["qkv4"]})
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapters(model, {"b": dirs["all2"]})
    other, _ = hf_tiny(tmp_path, "wide", hidden_size=32)
    with pytest.raises(ValueError, match=r"adapter a: gpt_neox.layers.0.attention.query_key_value with A \(4, 64\)"):
        load_adapters(load_model(other), {"a": dirs["qkv4"]})


def test_add_adapters_takes_factors_from_memory():
    """The lesson's entry point needs no files: a LoraConfig and each module's (A, B)."""
    from minicalm import CalmConfig, CalmForCausalLM

    model = CalmForCausalLM(CalmConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).init_weights(seed=0)
    A, B = torch.randn(2, 32), torch.randn(96, 2)
    factors = {"gpt_neox.layers.0.attention.query_key_value": (A, B)}
    names = add_adapters(model, {"x": (LoraConfig(r=2, alpha=4), factors)})
    assert names == ["x"]
    layer = model.gpt_neox.layers[0].attention.query_key_value
    h = torch.randn(2, 5, 32)
    with torch.no_grad(), row_adapters(model, torch.tensor([1, 0])):
        y = layer(h)
    base = layer.base_layer(h)
    assert_close_to_scale(y[0], base[0] + 2.0 * h[0] @ A.T @ B.T)
    assert torch.equal(y[1], base[1])
