"""Will it fit, and how long will it take? Memory and FLOPs of one training step, measured on shapes.

`python -m minicalm.plan --model open-calm-7b --micro-batch-size 4 --max-len 512 --grad-checkpoint`

The figures come from running the real training step (minicalm.loss.micro_step, then AdamW) on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no data, no memory), while a dispatch mode adds up the bytes of
every live tensor storage and keeps the peak, and torch's FlopCounterMode counts FLOPs. So the plan follows
the code: change the model or the loop and the plan changes with it. Not counted: the CUDA context
(~0.5 GB), allocator fragmentation and kernel workspaces; hence the margin asked for below.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .config import PRESETS, CalmConfig, get_preset
from .data import IGNORE_INDEX
from .lora import apply_lora
from .loss import micro_step
from .model import CalmForCausalLM
from .nf4 import quantize_blocks, trainable_parameters

A100_BF16_FLOPS = 312e12
GiB = 2**30
# Cards by memory, GiB as torch reports them (a "16 GB" T4 shows 15.1), the smallest first.
CARDS = [(7.6, "8 GB (RTX 3070, 4060)"), (11.7, "12 GB (RTX 3060, 4070)"), (15.1, "16 GB (T4, V100, RTX 4080)"),
         (23.6, "24 GB (A10, L4, RTX 4090)"), (39.4, "40 GB (A100)"), (79.1, "80 GB (A100, H100)")]


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of live tensor storages (each counted once, freed when its storage dies); keeps the peak.

    Fake tensors hold no data, so a boolean-mask index (the loss's scored positions) has no known size; the
    planner says how many positions the planned batch scores (`scored`) and the mask stands in as that many.
    """

    INDEX_OPS = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                 torch.ops.aten._index_put_impl_.default)

    def __init__(self, scored: int):
        super().__init__()
        self.scored, self.live, self.peak = scored, 0, 0
        self.seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.INDEX_OPS and any(i is not None and i.dtype == torch.bool for i in args[1]):
            idx = [[torch.zeros(self.scored, dtype=torch.long, device=i.device)] * i.dim()
                   if i is not None and i.dtype == torch.bool else [i] for i in args[1]]
            args = (args[0], [j for i in idx for j in i], *args[2:])
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    self.seen.add(st)
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, n)
        return out


@dataclass
class Plan:
    model: str
    micro_batch_size: int
    max_len: int                  # tokens per row in the memory figure (the longest batch)
    shared_tokens: int            # the rows' common head, computed once per micro-batch (0: no sharing)
    grad_checkpoint: bool
    dtype: str
    params: int
    trainable_params: int
    weights_bytes: int            # the frozen base (and the adapters)
    optimizer_bytes: int          # AdamW's two moments, fp32
    peak_bytes: int               # the training step's peak of live tensor bytes, micro-batch x max_len
    step_flops: float             # one micro-batch of average-length rows: forward, backward, optimizer
    flops_per_token: float        # step_flops per token of the rows (shared tokens counted in every row)
    epoch_tokens: float
    epoch_seconds: float          # at `utilization` of `peak_flops`
    utilization: float
    peak_flops: float

    def summary(self, epochs: float = 3, memory_bytes: float | None = None) -> str:
        lines = [f"plan for {self.model}: micro-batch {self.micro_batch_size} x {self.max_len} tokens"
                 + (f", the first {self.shared_tokens} shared" if self.shared_tokens else "")
                 + f", {self.dtype}, grad checkpoint {'on' if self.grad_checkpoint else 'off'}",
                 f"  parameters {self.params:,}, trainable {self.trainable_params:,}",
                 f"  weights {gib(self.weights_bytes)}, optimizer state {gib(self.optimizer_bytes)}, "
                 f"peak {gib(self.peak_bytes)}" + (f" of {memory_bytes / GiB:.0f} GiB" if memory_bytes else ""),
                 f"  {self.flops_per_token / 1e9:.3g} GFLOP per token; an epoch of {self.epoch_tokens / 1e6:.3g}M tokens "
                 f"at {self.utilization:.0%} of {self.peak_flops / 1e12:.0f} TFLOP/s (A100 bf16): "
                 f"{self.epoch_seconds / 3600:.2f} h, {epochs:g} epochs {epochs * self.epoch_seconds / 3600:.2f} h",
                 f"  the smallest card it fits with a 10% margin: {self.smallest_card() or 'none of ' + CARDS[-1][1]}"]
        return "\n".join(lines)

    def smallest_card(self) -> str | None:
        return next((card for gib_, card in CARDS if self.peak_bytes < 0.9 * gib_ * GiB), None)


def gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= 0.1 * GiB else f"{b / 2**20:.1f} MiB"


def config_of(model: str) -> CalmConfig:
    """A preset name or hub id (open-calm-7b, cyberagent/open-calm-7b), or a folder / config.json path."""
    if model.split("/")[-1] in PRESETS:
        return get_preset(model)
    path = Path(model)
    return CalmConfig.from_json(path / "config.json" if path.is_dir() else path)


def plan(model: str | CalmConfig, micro_batch_size: int = 8, max_len: int = 256, *, shared_tokens: int = 0,
         grad_checkpoint: bool = False, lora_r: int = 8, lora_targets=("query_key_value",), use_dora: bool = False,
         quantize: str | None = None, full: bool = False, answer_tokens: int = 4, train_on_inputs: bool = False,
         dtype: torch.dtype = torch.bfloat16, examples: int = 187_528, avg_tokens: float = 150.0,
         utilization: float = 0.5, peak_flops: float = A100_BF16_FLOPS, name: str | None = None) -> Plan:
    """Run the training step on fake tensors: memory at micro_batch_size x max_len (two steps: the second has
    AdamW's state), FLOPs at micro_batch_size x avg_tokens (what an epoch is made of)."""
    cfg = model if isinstance(model, CalmConfig) else config_of(model)
    B = micro_batch_size
    shared_tokens = shared_tokens if B > 1 else 0   # one row shares nothing
    avg = min(max(round(avg_tokens), shared_tokens + answer_tokens + 1), max_len)

    def batch(T: int):
        """input_ids (B, T) whose first shared_tokens are common, labels scoring the last answer_tokens (or all)."""
        x = torch.zeros(B, T, dtype=torch.long)
        y = x.clone()
        if not train_on_inputs:
            y[:, : T - answer_tokens] = IGNORE_INDEX
        return x, y, B * (T - 1 if train_on_inputs else answer_tokens)   # and the positions the loss scores

    with FakeTensorMode():
        x, y, scored = batch(max_len)
        with LiveBytes(scored) as mem:
            net = planned_model(cfg, torch.float32 if full else dtype, quantize, mem)
            if full:
                net.requires_grad_(True)
            else:
                apply_lora(net, tuple(lora_targets), r=lora_r, alpha=2 * lora_r, dropout=0.05, use_dora=use_dora)
            net.grad_checkpoint = grad_checkpoint
            net.train()
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            weights = mem.live
            for _ in range(2):   # the second step has AdamW's state: the steady state
                micro_step(net, x, y, n_target=1, shared=shared_tokens)
                opt.step()
                opt.zero_grad(set_to_none=True)
        # FLOPs in a separate step: FlopCounterMode keeps tensors alive and would inflate the memory figure.
        x, y, scored = batch(avg)
        with FlopCounterMode(display=False) as flops, LiveBytes(scored):
            micro_step(net, x, y, n_target=1, shared=shared_tokens)
            opt.step()
        opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)
        trainable, n_params = trainable_parameters(net)
    step_flops = float(flops.get_total_flops())
    per_token, epoch_tokens = step_flops / (B * avg), examples * avg_tokens
    return Plan(model=name or (model if isinstance(model, str) else "config"),
                micro_batch_size=B, max_len=max_len, shared_tokens=shared_tokens, grad_checkpoint=grad_checkpoint,
                dtype=str(torch.float32 if full else dtype).removeprefix("torch.") + (f", {quantize}" if quantize else ""),
                params=n_params, trainable_params=trainable, weights_bytes=weights, optimizer_bytes=opt_bytes,
                peak_bytes=mem.peak, step_flops=step_flops, flops_per_token=per_token, epoch_tokens=epoch_tokens,
                epoch_seconds=per_token * epoch_tokens / (utilization * peak_flops), utilization=utilization,
                peak_flops=peak_flops)


def planned_model(cfg: CalmConfig, dtype: torch.dtype, quantize: str | None, mem: LiveBytes) -> CalmForCausalLM:
    """The base model as load_model makes it, in its dtype and, with quantize="nf4", its blocks' linear weights in
    NF4. Those are quantized one at a time as they are read, so the dense model never exists: the peak counts from
    the quantized model on."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build the base directly in its dtype
    try:
        net = CalmForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if quantize:
        quantize_blocks(net, values=False)   # the same buffers as load_model's, not computed on fake tensors
        gc.collect()   # the dense weights' storages die here
        mem.peak = mem.live
    return net


def preflight(cfg, model_cfg: CalmConfig, lengths: list[int], device: torch.device, dtype: torch.dtype,
              shared: int = 0, log: bool = True, memory: int | None = None, bf16: bool | None = None) -> Plan:
    """train()'s check before loading the model: print the plan; refuse settings that would not fit in the GPU's
    memory (or in `memory` bytes when given), naming the first smaller setting that fits; on a GPU without bf16
    (`bf16`, default: asked of the GPU), say that --dtype float16 halves the base's memory."""
    kw = dict(lora_r=cfg.lora_r, lora_targets=cfg.lora_targets, use_dora=cfg.use_dora, full=cfg.full,
              train_on_inputs=cfg.train_on_inputs, dtype=dtype, examples=len(lengths),
              avg_tokens=sum(lengths) / len(lengths), name=cfg.model)
    T = min(cfg.max_len, max(lengths))
    shared = min(shared, T - 1)
    pl = plan(model_cfg, cfg.micro_batch_size, T, shared_tokens=shared, grad_checkpoint=cfg.grad_checkpoint,
              quantize=cfg.quantize, **kw)
    if device.type == "cuda":
        memory = memory or torch.cuda.get_device_properties(device).total_memory
        bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    if log:
        print(pl.summary(cfg.epochs, memory), file=sys.stderr, flush=True)
        if bf16 is False and dtype == torch.float32 and not cfg.full:
            print("  this GPU has no bf16: --dtype float16 runs the base in fp16 (fp32 adapters, a dynamic loss "
                  "scale) in half the memory", file=sys.stderr, flush=True)
    if memory and pl.peak_bytes > 0.9 * memory:
        quants = [cfg.quantize] + (["nf4"] if not cfg.full and not cfg.quantize else [])   # then QLoRA's 4-bit base
        options = [(mb, ckpt, q) for q in quants for ckpt in (False, True) for mb in (16, 8, 4, 2, 1)
                   if q != cfg.quantize or mb < cfg.micro_batch_size or ckpt]
        fits = next((f"--micro-batch-size {mb}" + " --grad-checkpoint" * ckpt + f" --quantize {q}" * (q != cfg.quantize)
                     for mb, ckpt, q in options if plan(model_cfg, mb, T, shared_tokens=shared, grad_checkpoint=ckpt,
                                                        quantize=q, **kw).peak_bytes < 0.9 * memory), None)
        raise MemoryError(f"the plan's peak {pl.peak_bytes / GiB:.1f} GiB exceeds 90% of this GPU's "
                          f"{memory / GiB:.1f} GiB; " + (f"try {fits}" if fits else "no micro-batch size fits"))
    return pl


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minicalm.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="open-calm-7b", help=f"preset ({', '.join(PRESETS)}), hub id or config.json")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--shared-tokens", type=int, default=75,
                   help="the prompt head every row shares, computed once per micro-batch (0: no sharing); default: "
                        "half of --avg-tokens, as the post's prompt is on Japanese reviews (README, the shared head)")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="query_key_value")
    p.add_argument("--use-dora", action="store_true", help="DoRA's magnitudes (and its extra work) on every target")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="the blocks' weights in NF4 (QLoRA)")
    p.add_argument("--train-on-inputs", action="store_true", help="logits and loss at every position")
    p.add_argument("--full", action="store_true", help="train every parameter (fp32) instead of LoRA")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--examples", type=int, default=187_528, help="examples per epoch (MARC-ja train)")
    p.add_argument("--avg-tokens", type=float, default=150.0, help="average tokens per example")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--utilization", type=float, default=0.5, help="share of peak FLOP/s assumed")
    p.add_argument("--peak-tflops", type=float, default=312.0, help="A100 bf16 dense: 312")
    p.add_argument("--memory-gb", type=float, default=40.0, help="accelerator memory, GiB")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    a = p.parse_args(argv)
    kw = dict(grad_checkpoint=a.grad_checkpoint, lora_r=a.lora_r, lora_targets=tuple(a.lora_targets.split(",")),
              use_dora=a.use_dora, quantize=a.quantize, full=a.full, train_on_inputs=a.train_on_inputs,
              dtype=getattr(torch, a.dtype), examples=a.examples,
              avg_tokens=a.avg_tokens, utilization=a.utilization, peak_flops=a.peak_tflops * 1e12, name=a.model)
    plans = [plan(a.model, a.micro_batch_size, a.max_len, shared_tokens=s, **kw)
             for s in dict.fromkeys((a.shared_tokens, 0))]   # with sharing, then without for comparison
    memory = a.memory_gb * GiB
    fits = lambda pl: pl.peak_bytes < 0.9 * memory
    if a.json:
        print(json.dumps([asdict(pl) | {"epochs": a.epochs, "total_seconds": a.epochs * pl.epoch_seconds,
                                        "memory_bytes": memory, "fits": fits(pl)} for pl in plans]))
        return
    print(plans[0].summary(a.epochs, memory))
    print(f"  fits in {a.memory_gb:g} GiB with a 10% margin: {'yes' if fits(plans[0]) else 'NO'}")
    for pl in plans[1:]:
        print(f"without sharing (--shared-tokens 0): peak {gib(pl.peak_bytes)}, {pl.flops_per_token / 1e9:.3g} GFLOP "
              f"per token, {a.epochs:g} epochs {a.epochs * pl.epoch_seconds / 3600:.2f} h")


if __name__ == "__main__":
    main()
