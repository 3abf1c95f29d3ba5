"""LoRA (Hu et al. 2021, arXiv 2106.09685): a trainable low-rank update beside each frozen nn.Linear.

    h = W x + b + (alpha / r) * B A x      W (out x in) frozen;  A (r x in), B (out x r) trained

`apply_lora` swaps the chosen nn.Linears of an already loaded model for LoRALinear and freezes everything else;
training then updates only lora_A and lora_B; `merge_lora` folds B A into W for inference. The adapter's files (PEFT's
format) are in adapter.py, LoRA's variants (DoRA, rsLoRA, PiSSA, OLoRA, LoRA+) in variants.py. A and B are fp32
parameters whatever the base's dtype (train.py states the dtype policy).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4 import NF4Linear, dense, linear, store
from .variants import add_dora, check_init, check_original_base, dora_forward, dora_merge, dora_unmerge, init_lora

VALID_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")   # in a block's order


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank path; it starts equal to the base layer because B is zero.

        x ──┬──────────── W x + b ───────────────────────────────┐
            └─ dropout ─> A (r x in) ─> B (out x r) ─> * alpha/r ─(+)─> h

    `weight` / `bias` are the base layer's own Parameters, so the base state-dict keys do not change; the adapter
    adds `lora_A.weight` and `lora_B.weight`, the names PEFT saves. merge() adds scaling * B A into `weight` and
    unmerge() subtracts it again. Nothing else is stored, so unmerge restores W to rounding (fp32: ~1e-7 relative;
    bf16: one rounding of the merged weight) and A, B must not change while merged. `disabled` runs the base alone.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)          # the same Parameter: no copy, same key
        self.register_parameter("bias", None if base.bias is None else base.bias.requires_grad_(False))
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)   # rsLoRA's, or the paper's alpha / r
        fp32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **fp32)
        self.lora_B = nn.Linear(r, self.out_features, **fp32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT does
        nn.init.zeros_(self.lora_B.weight)                             # B A = 0: the model starts unchanged
        self.lora_dropout = nn.Dropout(dropout)
        self.register_parameter("lora_magnitude_vector", None)   # DoRA's m (variants.add_dora); None: plain LoRA
        self.init_lora_weights = True                            # how A and B began (variants.init_lora)
        self.merged = self.disabled = False
        self.train(base.training)   # new submodules default to train mode; follow the layer we replace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            raise RuntimeError("LoRALinear is merged, so it cannot run with the adapter disabled: unmerge() first")
        y = linear(x, self.weight, self.bias)   # F.linear, or an NF4 base dequantized on the fly (nf4.py)
        if self.merged or self.disabled:   # merged: B A is already inside weight
            return y
        A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)   # a differentiable cast
        lora = F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling
        return y + lora if self.lora_magnitude_vector is None else dora_forward(self, y, lora)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """scaling * B A, (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            W, dora = dense(self.weight).float(), self.lora_magnitude_vector is not None
            self.weight = store(self.weight, dora_merge(self, W) if dora else W + self.delta())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            W, dora = self.weight.float(), self.lora_magnitude_vector is not None
            self.weight = store(self.weight, dora_unmerge(self, W) if dora else W - self.delta())
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def check_targets(r, targets, source: str = "apply_lora") -> tuple[str, ...]:
    """Validate r and the target names; return the targets as a tuple in VALID_TARGETS order."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown or not targets:
        raise ValueError(f"{source}: unknown LoRA targets {unknown or targets}; valid targets: {list(VALID_TARGETS)}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{source}: LoRA rank r must be a positive integer, got {r!r}")
    return tuple(t for t in VALID_TARGETS if t in targets)


def apply_lora(model: nn.Module, targets=("query_key_value",), r: int = 8, alpha: float = 16, dropout: float = 0.05,
               *, use_dora: bool = False, use_rslora: bool = False, init_lora_weights=True) -> nn.Module:
    """Swap every nn.Linear named `*.<target>` for a LoRALinear and freeze all other parameters. The variants take
    PEFT's names (variants.py): use_dora, use_rslora, init_lora_weights True, "gaussian", "pissa", "olora", ...

    The last name component must match exactly, as PEFT's suffix match does: `dense` is attention.dense only."""
    targets, found = check_targets(r, targets), adaptable(model, targets)
    init = check_init(init_lora_weights, use_dora, quantized=any(isinstance(m, NF4Linear) for m in found.values()))
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    if not found:
        raise ValueError(f"apply_lora: no nn.Linear in the model is named like {list(targets)}")
    model.requires_grad_(False)
    for name, base in found.items():
        layer = LoRALinear(base, r, alpha, dropout, use_rslora)
        init_lora(layer, init)   # PiSSA and OLoRA also turn the base weight into the residual W - s B A
        if use_dora:
            add_dora(layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def adaptable(model: nn.Module, targets) -> dict[str, nn.Module]:
    """The linear layers (dense or NF4) named `*.<target>`, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear)) and n.rpartition(".")[2] in targets}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_settings(model: nn.Module) -> dict | None:
    """apply_lora's settings, read back from the LoRALinear modules (it gives them all the same); None without LoRA."""
    layers = lora_layers(model)
    if not layers:
        return None
    m = next(iter(layers.values()))
    names = {n.rpartition(".")[2] for n in layers}
    return {"r": m.r, "alpha": m.alpha, "dropout": m.lora_dropout.p,
            "targets": tuple(t for t in VALID_TARGETS if t in names), "use_dora": m.lora_magnitude_vector is not None,
            "use_rslora": m.use_rslora, "init_lora_weights": m.init_lora_weights}


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone inside the block (e.g. reference logits); the adapters come back after."""
    layers = list(lora_layers(model).values())
    check_original_base(layers)   # PiSSA's and OLoRA's is a residual (variants.py)
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold scaling * B A into every LoRA layer's weight (idempotent). Undo with unmerge_lora."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model
