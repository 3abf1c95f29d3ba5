"""Will it fit, and how long will it take? Memory and FLOPs of one training step, measured on shapes.

`python -m minicalm plan --model open-calm-7b --micro-batch-size 4 --max-len 512 --grad-checkpoint`

The figures come from running the real training step (loss.answer_loss, backward, then AdamW) on fake tensors
(torch's FakeTensorMode: shapes and dtypes, no data, no memory), while a dispatch mode adds up the bytes of
every live tensor storage and keeps the peak, and torch's FlopCounterMode counts FLOPs. So the plan follows
the code: change the model or the loop and the plan changes with it. Not counted: the CUDA context
(~0.5 GB), allocator fragmentation and kernel workspaces; hence the margin asked for below.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..config import CalmConfig, Dtype, LoraConfig, PRESETS, get_preset, resolve_dtype
from ..lora import apply_lora, trainable_parameters
from ..loss import IGNORE_INDEX, answer_loss, shared_prefix_len
from ..model import CalmForCausalLM
from ..nf4 import quantize_blocks

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
class PlanConfig:
    model: str = "open-calm-7b"              # preset (open-calm-small ... -7b, tiny), hub id, folder or config.json
    micro_batch_size: int = 16               # rows per forward/backward
    max_len: int = 256                       # tokens per row in the memory figure (the longest batch)
    shared_prefix: int = 75                  # the prompt prefix every row shares, computed once per micro-batch
                                             # (0: none); default: half of avg_tokens, as the post's prompt is on
                                             # Japanese reviews (README, the shared prompt prefix)
    grad_checkpoint: bool = False            # recompute activations in backward instead of keeping them
    lora: LoraConfig = field(default_factory=LoraConfig)   # the adapter, as in training
    quantize: Literal["nf4"] | None = None   # the blocks' weights in NF4 (QLoRA)
    train_on_inputs: bool = False            # logits and loss at every position
    full: bool = False                       # train every parameter (fp32) instead of LoRA
    dtype: Dtype = "auto"                    # the base's; auto: bf16, as on the A100
    examples: int = 187_528                  # examples per epoch (MARC-ja train)
    avg_tokens: float = 150.0                # average tokens per example
    answer_tokens: int = 4                   # scored tokens per row (the answer word and EOS)
    epochs: float = 3                        # epochs in the time estimate
    utilization: float = 0.5                 # share of the peak FLOP/s assumed
    peak_tflops: float = 312.0               # the GPU's peak: A100 bf16 dense, 312
    memory_gb: float = 40.0                  # the GPU's memory, GiB
    json: bool = False                       # print the figures as one JSON object

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)


@dataclass
class Plan:
    model: str
    micro_batch_size: int
    max_len: int                  # tokens per row in the memory figure (the longest batch)
    shared_prefix: int            # the rows' shared prompt prefix, computed once per micro-batch (0: no sharing)
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
                 + (f", the first {self.shared_prefix} shared" if self.shared_prefix else "")
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


def plan(cfg: PlanConfig, model_cfg: CalmConfig | None = None) -> Plan:
    """Run the training step on fake tensors: memory at micro_batch_size x max_len (two steps: the second has
    AdamW's state), FLOPs at micro_batch_size x avg_tokens (what an epoch is made of). model_cfg: the model's
    CalmConfig (default: cfg.model's)."""
    model_cfg = model_cfg or config_of(cfg.model)
    dtype = torch.float32 if cfg.full else resolve_dtype(cfg.dtype, "cuda", bf16=True)   # an A100's rule
    B = cfg.micro_batch_size
    avg = min(max(round(cfg.avg_tokens), cfg.shared_prefix + cfg.answer_tokens + 1), cfg.max_len)
    x, y, scored, P = planned_batch(cfg, cfg.max_len)
    x2, y2, scored2, P2 = planned_batch(cfg, avg)   # real tensors: the shared prefix's length needs their values
    with FakeTensorMode() as fake:
        x, y = fake.from_tensor(x), fake.from_tensor(y)
        with LiveBytes(scored) as mem:
            net = planned_model(model_cfg, cfg, dtype, mem)
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
            weights = mem.live
            for _ in range(2):   # the second step has AdamW's state: the steady state
                answer_loss(net, x, y, prefix=P).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        # FLOPs in a separate step: FlopCounterMode keeps tensors alive and would inflate the memory figure.
        x, y = fake.from_tensor(x2), fake.from_tensor(y2)
        with FlopCounterMode(display=False) as flops, LiveBytes(scored2):
            answer_loss(net, x, y, prefix=P2).backward()
            opt.step()
        opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)
        trainable, n_params = trainable_parameters(net)
    step_flops = float(flops.get_total_flops())
    per_token, epoch_tokens = step_flops / (B * avg), cfg.examples * cfg.avg_tokens
    peak_flops = cfg.peak_tflops * 1e12
    return Plan(model=cfg.model, micro_batch_size=B, max_len=cfg.max_len, shared_prefix=P,
                grad_checkpoint=cfg.grad_checkpoint,
                dtype=str(dtype).removeprefix("torch.") + (f", {cfg.quantize}" if cfg.quantize else ""),
                params=n_params, trainable_params=trainable, weights_bytes=weights, optimizer_bytes=opt_bytes,
                peak_bytes=mem.peak, step_flops=step_flops, flops_per_token=per_token, epoch_tokens=epoch_tokens,
                epoch_seconds=per_token * epoch_tokens / (cfg.utilization * peak_flops), utilization=cfg.utilization,
                peak_flops=peak_flops)


def planned_batch(cfg: PlanConfig, T: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(input_ids (B, T) whose first shared_prefix tokens are common to the rows, labels scoring the last
    answer_tokens (or every position), the positions the loss scores, the shared prefix's length by loss's rule)."""
    B = cfg.micro_batch_size
    x = torch.arange(B)[:, None].expand(B, T).clone()   # rows differ everywhere ...
    x[:, :cfg.shared_prefix] = 0                         # ... but in the shared prefix
    y = x.clone()
    if not cfg.train_on_inputs:
        y[:, : T - cfg.answer_tokens] = IGNORE_INDEX
    P = shared_prefix_len(x.tolist()) if cfg.shared_prefix else 0   # the rule: none for one row, a token of each own
    return x, y, B * (T - 1 if cfg.train_on_inputs else cfg.answer_tokens), P


def planned_model(model_cfg: CalmConfig, cfg: PlanConfig, dtype: torch.dtype, mem: LiveBytes) -> CalmForCausalLM:
    """The model as training makes it: the base in its dtype (and with quantize="nf4" its blocks' linear weights in
    NF4), LoRA or every parameter trainable, in train mode. load_model fills the base tensor by tensor and quantizes
    each weight as it is read, so neither the fp32 model nor the dense one exists there: the peak counts from the
    model as it is then."""
    net = cast(CalmForCausalLM(model_cfg), dtype)
    if cfg.quantize:
        quantize_blocks(net, values=False)   # the same buffers as load_model's, not computed on fake tensors
    gc.collect()   # the storages left behind die here
    mem.peak = mem.live
    if cfg.full:
        net.requires_grad_(True)
    else:
        apply_lora(net, cfg.lora)
    net.grad_checkpoint = cfg.grad_checkpoint
    return net.train()


def cast(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Each parameter as a new one in `dtype` (module.to cannot swap fake tensors), tied ones kept tied; the old ones
    die when this returns."""
    new = {}   # id of an old parameter -> (it, its cast): holding the old one keeps its id from being reused meanwhile
    for m in net.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if id(p) not in new:
                new[id(p)] = p, torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
            setattr(m, name, new[id(p)][1])
    return net


def preflight(cfg, model_cfg: CalmConfig, lengths: list[int], device: torch.device, dtype: torch.dtype,
              shared: int = 0, memory: int | None = None, bf16: bool | None = None) -> Plan:
    """train()'s check before loading the model (cfg: its TrainConfig): print the plan; refuse settings that would
    not fit in the GPU's memory (or in `memory` bytes when given), naming the first smaller setting that fits; on a
    GPU without bf16 (`bf16`, default: asked of the GPU), say that dtype float16 halves the base's memory."""
    T = min(cfg.max_len, max(lengths))
    pc = PlanConfig(model=cfg.model, micro_batch_size=cfg.micro_batch_size, max_len=T,
                    shared_prefix=shared,
                    grad_checkpoint=cfg.grad_checkpoint, lora=cfg.lora, quantize=cfg.quantize,
                    train_on_inputs=cfg.train_on_inputs, full=cfg.full, dtype=str(dtype).removeprefix("torch."),
                    examples=len(lengths), avg_tokens=sum(lengths) / len(lengths), epochs=cfg.epochs)
    pl = plan(pc, model_cfg)
    if device.type == "cuda":
        memory = memory or torch.cuda.get_device_properties(device).total_memory
        bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    if cfg.log:
        print(pl.summary(cfg.epochs, memory), file=sys.stderr, flush=True)
        if bf16 is False and dtype == torch.float32 and not cfg.full:
            print("  this GPU has no bf16: --dtype float16 runs the base in fp16 (fp32 adapters, a dynamic loss "
                  "scale) in half the memory", file=sys.stderr, flush=True)
    if memory and pl.peak_bytes > 0.9 * memory:
        quants = [cfg.quantize] + (["nf4"] if not cfg.full and not cfg.quantize else [])   # then QLoRA's 4-bit base
        options = [(mb, ckpt, q) for q in quants for ckpt in (False, True) for mb in (16, 8, 4, 2, 1)
                   if q != cfg.quantize or mb < cfg.micro_batch_size or ckpt]
        fits = next((f"--micro-batch-size {mb}" + " --grad-checkpoint" * ckpt + f" --quantize {q}" * (q != cfg.quantize)
                     for mb, ckpt, q in options
                     if plan(dataclasses.replace(pc, micro_batch_size=mb, grad_checkpoint=ckpt, quantize=q),
                             model_cfg).peak_bytes < 0.9 * memory), None)
        raise MemoryError(f"the plan's peak {pl.peak_bytes / GiB:.1f} GiB exceeds 90% of this GPU's "
                          f"{memory / GiB:.1f} GiB; " + (f"try {fits}" if fits else "no micro-batch size fits"))
    return pl


def show(cfg: PlanConfig) -> None:
    """python -m minicalm plan: the plan with the shared prefix, then without it for comparison."""
    plans = [plan(dataclasses.replace(cfg, shared_prefix=s)) for s in dict.fromkeys((cfg.shared_prefix, 0))]
    memory = cfg.memory_gb * GiB
    fits = lambda pl: pl.peak_bytes < 0.9 * memory   # noqa: E731
    if cfg.json:
        print(json.dumps([asdict(pl) | {"epochs": cfg.epochs, "total_seconds": cfg.epochs * pl.epoch_seconds,
                                        "memory_bytes": memory, "fits": fits(pl)} for pl in plans]))
        return
    print(plans[0].summary(cfg.epochs, memory))
    print(f"  fits in {cfg.memory_gb:g} GiB with a 10% margin: {'yes' if fits(plans[0]) else 'NO'}")
    for pl in plans[1:]:
        print(f"without sharing (--shared-prefix 0): peak {gib(pl.peak_bytes)}, {pl.flops_per_token / 1e9:.3g} GFLOP "
              f"per token, {cfg.epochs:g} epochs {cfg.epochs * pl.epoch_seconds / 3600:.2f} h")
