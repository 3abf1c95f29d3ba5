"""QLoRA's NF4 base (nf4.py) against the references nobody here wrote: bitsandbytes' NF4 (its CPU path) and torchao's
NF4Tensor give the same 4-bit codes and dequantized weights; the 16 values are the normal quantiles the QLoRA paper
names; the double-quantized scales stay within their step; the layer saves nothing of the weight for backward;
load_model(quantize="nf4") gives the model of the dequantized weights; LoRA and DoRA on it equal LoRA on those
weights dense; merging makes the layer dense and unmerging brings NF4 back; fp16 training skips an overflowing step and lowers its loss scale;
the planner counts NF4's bytes, names the smallest card, and its peak meets the allocator's."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REVIEWS, assert_close_to_scale, hf_tiny
from minicalm import load_model
from minicalm.io.adapter import save_merged
from minicalm.lora import apply_lora, lora_layers, merge_lora, unmerge_lora
from minicalm.nf4 import NF4, NF4Linear, NF4Weight, quantize_codes, quantize_scales

IDS = torch.tensor([[3, 17, 42, 5, 99, 0, 64, 7], [1, 2, 3, 4, 5, 6, 7, 8]])


def weight(rows: int = 256, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights as a trained layer has them: normal, with some large outliers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    return w + (torch.rand(rows, cols, generator=g) < 0.001) * torch.randn(rows, cols, generator=g) * 0.5


def test_the_16_values_are_normal_quantiles_scaled_into_minus_one_one():
    """QLoRA, section 3 and appendix E: 8 positive and 7 negative quantiles of N(0, 1) at evenly spaced
    probabilities from 0.5 to 1 - 1/(2 * 15.5)... (offset 0.9677), an exact zero, divided by the largest."""
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat((pos, neg, torch.zeros(1, dtype=torch.float64))).sort().values
    assert_close_to_scale(torch.tensor(NF4, dtype=torch.float64), values / values.abs().max(), rel=3e-7)


def test_codes_and_dequantized_weights_equal_bitsandbytes():
    """bitsandbytes' 4-bit NF4 without double quantization: the same packed codes (a tie could differ; none here)
    and absmax, so the same dequantized weights."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    for w in (weight(), weight(96, 64, seed=1).to(torch.bfloat16)):
        packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        codes, absmax = quantize_codes(w)
        assert torch.equal(codes, packed.flatten()) and torch.equal(absmax, state.absmax.float())
        ours = (torch.tensor(NF4)[torch.stack((codes >> 4, codes & 15), 1).flatten().long()].reshape(-1, 64)
                * absmax[:, None]).reshape(w.shape)
        assert torch.equal(ours.to(w.dtype), dequantize_4bit(packed, state))


def test_codes_and_double_quantized_weights_equal_torchao():
    """torchao's NF4Tensor (blocks of 64, scales double-quantized in blocks of 256): the same codes except at
    near-ties (its table of the 16 values differs from the paper's in the fifth decimal), and where the codes are the
    same, the same dequantized weights to 1e-4 of their scale (the same table difference, times the scales)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    w = weight()
    theirs, ours = to_nf4(w, block_size=64, scaler_block_size=256), NF4Weight(w)
    unpack = lambda c: torch.stack((c >> 4, c & 15), 1).flatten().long()   # noqa: E731
    a, b = unpack(ours.codes), unpack(theirs.quantized_data.flatten())
    differ = a != b
    blocks = w.reshape(-1, 64)
    scaled = (blocks / blocks.abs().amax(1, keepdim=True)).flatten()[differ]
    nf4 = torch.tensor(NF4)
    assert differ.float().mean() < 1e-3 and ((a[differ] - b[differ]).abs() == 1).all()
    assert ((scaled - (nf4[a[differ]] + nf4[b[differ]]) / 2).abs() < 1e-4).all()   # within 1e-4 of the midpoint
    same = ~differ.reshape(w.shape)
    assert_close_to_scale(ours.dequantize()[same], theirs.get_original_weight()[same], rel=1e-4)


def test_double_quantized_scales_stay_within_their_step_and_cost_0_127_bits():
    w = weight(1024, 1024)
    _, absmax = quantize_codes(w)
    q = NF4Weight(w)
    step = (absmax - absmax.mean()).reshape(-1, 256).abs().amax(1)[:, None] / 128   # one int8 step per block of 256
    error = (q.absmax() - absmax).reshape(-1, 256).abs()
    # rounding: half a step; the largest positive scale of a block, 128 steps, is clamped to int8's 127: one step
    assert (error <= step * (1 + 1e-4)).all() and (error <= step / 2 * (1 + 1e-4)).float().mean() > 0.99
    assert 4.125 < 8 * q.nbytes() / w.numel() < 4.128   # 4 + 8/64 + 32/(64 * 256), the mean's 32 bits aside
    codes, factor, mean = quantize_scales(absmax[:300])   # a short last block of scales
    assert codes.shape == (300,) and factor.shape == (2,)


def test_the_layer_computes_with_the_dequantized_weight_and_saves_nothing_of_it():
    base = nn.Linear(256, 192)
    layer = NF4Linear.quantize(base)
    W = layer.weight.dequantize()
    x = torch.randn(4, 7, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert sum(t.numel() * t.element_size() for t in saved) <= layer.weight.nbytes()   # no (out, in) tensor
    assert not any(t.shape == W.shape for t in saved)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    want = F.linear(x2, W, base.bias)
    want.square().sum().backward()
    assert_close_to_scale(y, want)
    assert_close_to_scale(x.grad, x2.grad)


@pytest.fixture
def checkpoint(tmp_path):
    return hf_tiny(tmp_path, hidden_size=64, intermediate_size=256)


def dense_twin(folder, quantized):
    """The same checkpoint loaded dense, with every block weight replaced by the NF4 model's dequantized one."""
    twin = load_model(folder)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, NF4Weight):
                twin.get_parameter(name).copy_(m.dequantize())
    return twin


def test_load_model_quantizes_the_blocks_and_nothing_else(checkpoint):
    folder, _ = checkpoint
    q = load_model(folder, quantize="nf4")
    quantized = [n for n, m in q.named_modules() if isinstance(m, NF4Linear)]
    assert len(quantized) == 2 * 4 and all(".layers." in n for n in quantized)
    assert isinstance(q.embed_out, nn.Linear) and isinstance(q.gpt_neox.embed_in.weight, nn.Parameter)
    twin = dense_twin(folder, q)
    with torch.no_grad():
        assert_close_to_scale(q(IDS), twin(IDS))
        assert (q(IDS) - load_model(folder)(IDS)).abs().max() > 0   # it really is 4-bit
    with pytest.raises(ValueError, match="'nf8'"):
        load_model(folder, quantize="nf8")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_on_nf4_equals_lora_on_the_dequantized_base(checkpoint, use_dora):
    """QLoRA: the adapters in full precision beside the 4-bit base compute what they compute beside its dequantized
    weights: the logits, the loss with the shared prefix, every gradient; merging makes the layers dense."""
    folder, _ = checkpoint
    q = load_model(folder, quantize="nf4")
    twin = dense_twin(folder, q)
    for model in (q, twin):
        torch.manual_seed(0)
        apply_lora(model, targets=("query_key_value", "dense_4h_to_h"), r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    with torch.no_grad():
        for (name, a), b in zip(lora_layers(q).items(), lora_layers(twin).values()):
            b.lora_B.weight.copy_(a.lora_B.weight.normal_(std=0.05))
    from minicalm.loss import answer_loss
    x, y = IDS.clone(), IDS.clone()
    y[:, :3] = -100
    x[1, :3] = x[0, :3]   # a shared prefix of 3 tokens
    losses = [answer_loss(m.train(), x, y, prefix=3) for m in (q, twin)]
    for loss in losses:
        loss.backward()
    assert_close_to_scale(losses[0].detach(), losses[1].detach())
    for (name, p), p2 in zip([(n, p) for n, p in q.named_parameters() if p.requires_grad],
                             [p for p in twin.parameters() if p.requires_grad]):
        assert_close_to_scale(p.grad, p2.grad, msg=name)
    codes = {n: m.base_layer.weight.codes.clone() for n, m in lora_layers(q).items()}
    with torch.no_grad():
        want = q.eval()(IDS)
        merge_lora(q)
        assert all(isinstance(m.weight, nn.Parameter) for m in lora_layers(q).values())   # merged layers are dense
        assert_close_to_scale(q(IDS), want)
        unmerge_lora(q)   # the NF4 layers come back, their codes untouched
        assert all(isinstance(m.base_layer, NF4Linear) and torch.equal(m.base_layer.weight.codes, codes[n])
                   for n, m in lora_layers(q).items())
        assert_close_to_scale(q(IDS), want)


def test_a_merged_nf4_model_is_saved_dense_for_transformers(checkpoint, tmp_path):
    from transformers import GPTNeoXForCausalLM

    folder, _ = checkpoint
    q = apply_lora(load_model(folder, quantize="nf4"), targets=("query_key_value",), r=4, alpha=8)
    with torch.no_grad():
        want = q.eval()(IDS)
        out = save_merged(q, tmp_path / "merged")
        back = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert_close_to_scale(back(IDS).logits, want)


def test_fp16_skips_an_overflowing_step_and_lowers_the_loss_scale(base, tmp_path, monkeypatch):
    """--dtype float16 (GPUs without bf16): the loss is scaled up before backward; a step whose gradients overflow is
    skipped, its weights untouched, the scale halved; the next steps train."""
    T = importlib.import_module("minicalm.train")   # the module (minicalm.train is the function)

    real, calls = T.answer_loss, []

    def overflow_on_step_2(model, *args, **kw):
        loss = real(model, *args, **kw)
        calls.append(1)
        if len(calls) == 2:   # this step's backward overflows: a gradient element becomes inf
            p = next(p for p in model.parameters() if p.requires_grad)
            hook = p.register_hook(lambda g: (hook.remove(), g.index_fill(0, torch.tensor([0]), float("inf")))[1])
        return loss

    monkeypatch.setattr(T, "answer_loss", overflow_on_step_2)
    snapshots = []
    cfg = T.TrainConfig(model=str(base[0]), train_file=str(REVIEWS / "train.jsonl"), valid_file="none",
                        out=str(tmp_path / "run"), limit_train=32, batch_size=8, micro_batch_size=8, max_len=128,
                        max_steps=4, warmup_steps=1, lr=1e-2, save_every=0, device="cpu", dtype="float16", log=False)
    T.train(cfg, on_step=lambda run, rec: snapshots.append(
        {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}))
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, False, False]
    assert [r["loss_scale"] for r in recs] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 15, 2.0 ** 15]
    assert all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])        # step 2 changed nothing
    assert not all(torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[1])    # step 3 trained
    assert all(p.dtype == torch.float32 for p in snapshots[0].values())                    # fp32 adapters


def test_the_planner_counts_nf4_and_names_the_smallest_card():
    from minicalm.tools.plan import PlanConfig, plan

    bf16, nf4 = (plan(PlanConfig("open-calm-7b", 16, 256, shared_prefix=75, quantize=q)) for q in (None, "nf4"))
    # 6.44B block weights at 4.127 bits and the 0.43B-parameter embedding and head in bf16: 3.9 GiB, not 12.8
    assert 12.5 * 2**30 < bf16.weights_bytes < 13 * 2**30 and 3.8 * 2**30 < nf4.weights_bytes < 4.1 * 2**30
    assert nf4.params == bf16.params and nf4.trainable_params == bf16.trainable_params
    assert bf16.peak_bytes - nf4.peak_bytes > 8.5 * 2**30
    assert bf16.smallest_card().startswith("40 GB") and nf4.smallest_card().startswith(("16 GB", "24 GB"))


def test_preflight_suggests_fp16_without_bf16_and_nf4_when_nothing_else_fits(capsys):
    from minicalm.config import get_preset
    from minicalm.tools.plan import preflight
    from minicalm.train import TrainConfig

    cfg, small = TrainConfig(micro_batch_size=16), get_preset("open-calm-small")
    preflight(cfg, small, [150] * 100, torch.device("cpu"), torch.float32, shared=75, memory=80 * 2**30, bf16=False)
    assert "this GPU has no bf16: --dtype float16" in capsys.readouterr().err
    # 0.3 GiB: less than open-calm-small's bf16 weights (0.31 GiB), more than its NF4 ones (0.2 GiB)
    with pytest.raises(MemoryError, match=r"try --micro-batch-size \d+( --grad-checkpoint)? --quantize nf4$"):
        preflight(TrainConfig(micro_batch_size=16, log=False), small, [150] * 100, torch.device("cpu"),
                  torch.bfloat16, shared=75, memory=0.3 * 2**30)


MEASURE_NF4 = r"""
import gc, json, sys, torch
from torch.profiler import ProfilerActivity, profile
from minicalm.config import CalmConfig
from minicalm.lora import apply_lora
from minicalm.loss import answer_loss
from minicalm.model import CalmForCausalLM
from minicalm.nf4 import quantize_blocks
cfg, B, T = json.loads(sys.argv[1])
m = quantize_blocks(CalmForCausalLM(CalmConfig(**cfg))).train()
apply_lora(m, targets=("query_key_value",), r=8, alpha=16, dropout=0.05)
gc.collect()
live = peak = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])   # the loaded model
x = torch.randint(0, cfg["vocab_size"], (B, T))
y = x.clone()
y[:, :T - 5] = -100
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        answer_loss(m, x, y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
    live += e.nbytes(); peak = max(peak, live)
print(json.dumps(peak))
"""


def test_the_planned_nf4_peak_meets_the_allocator_s():
    from minicalm.config import CalmConfig
    from minicalm.tools.plan import PlanConfig, plan

    cfg = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
    out = subprocess.run([sys.executable, "-c", MEASURE_NF4, json.dumps([cfg, 8, 128])], capture_output=True,
                         text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    planned = plan(PlanConfig(micro_batch_size=8, max_len=128, shared_prefix=0, quantize="nf4", answer_tokens=5,
                              dtype="float32"), CalmConfig(**cfg)).peak_bytes
    assert abs(planned - measured) <= 0.03 * measured, (planned, measured)
