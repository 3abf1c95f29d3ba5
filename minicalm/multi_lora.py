"""Many LoRA adapters on one base, in one batch: each row of a batch names its adapter, or none (the base).

    h_i = W x_i + b + s_a B_a A_a x_i        row i uses adapter a = rows[i];  a = 0: the base (A_0 = B_0 = 0)

lora.py gives a base one adapter and every row the same update. To serve several (a sentiment adapter, a QA adapter,
the base itself) to requests that arrive together, the update must follow the row: S-LoRA (Sheng et al. 2023, arXiv
2311.03285) and Punica (Chen et al. 2023, arXiv 2310.18547, its BGMV kernel, "batched gather matrix-vector") keep
every adapter's A and B side by side and let each row gather its own pair. Here, per adapted layer:

    A  (N+1, r, in)     the N adapters' A stacked, each zero-padded to the largest rank r (a padded rank adds zero
                        terms), index 0 all zeros: the base
    B  (N+1, out, r)    likewise, with each adapter's scale s (alpha / r, or rsLoRA's alpha / sqrt(r)) folded in
    rows (B,)           each row's adapter index

    y = W x + b  +  (x @ A[rows]^T) @ B[rows]^T          x (B, T, in) -> (B, T, r) -> (B, T, out): two batched matmuls

So one forward runs a batch whose rows use different adapters, of different ranks, scales and targets (a layer an
adapter does not adapt holds zeros in its slot). peft's mixed batches (`adapter_names=[...]`) compute the same update
by looping over the adapters present. The gather copies r x (in + out) numbers per row and layer (for 8 rows at r 16,
a fifth of W's in x out); a batch over four adapters runs within 7% of the same batch on one LoRALinear
(bench/bench.py --part serve). Inference only (no dropout, no gradients); DoRA is refused, as peft's mixed batch refuses
it: its per-row rescaling by m / ||W + s B A|| would need each adapter's norm per row. An adapter trained on PiSSA's or
OLoRA's residual base is refused too (it changes the base, which every row shares); minicalm saves those as plain LoRA.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import LoraConfig
from .lora import adaptable, lora_layers

# What an adapter brings: its settings and, by module name, A (r, in) and B (out, r) (io/adapter.py reads a folder's).
AdapterFactors = tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]


class MultiLoRALinear(nn.Module):
    """A frozen base layer and N adapters beside it; each row of the batch takes its own (`rows`, set by
    row_adapters). Without rows every row runs on the base alone."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base.requires_grad_(False)
        self.register_buffer("A", A)   # (N+1, r, in) fp32; [0] is zeros: the base
        self.register_buffer("B", B)   # (N+1, out, r) fp32, s folded in
        self.rows: torch.Tensor | None = None   # (B,) each row's adapter index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                        # W x + b, (B, T, out)
        if self.rows is None:
            return y
        A = self.A[self.rows].to(x.dtype)             # (B, r, in): each row gathers its own A ...
        B = self.B[self.rows].to(x.dtype)             # (B, out, r) ... and its own s B
        return y + (x @ A.mT) @ B.mT                  # (B, T, r) -> (B, T, out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.A.shape[0] - 1}, r={self.A.shape[1]}"


def add_adapters(model: nn.Module, adapters: dict[str, AdapterFactors]) -> list[str]:
    """Give the model every adapter at once: each block layer some adapter targets becomes a MultiLoRALinear holding
    all of them. Returns the names in index order, from 1 (0 is the base). Everything is checked before the model is
    touched."""
    if lora_layers(model) or multi_lora_layers(model):
        raise ValueError("add_adapters: the model already has LoRA layers; start from the base model")
    for name, (cfg, factors) in adapters.items():
        if cfg.use_dora:
            raise ValueError(f"adapter {name}: DoRA cannot share a batch with other adapters (its norm is per adapter; "
                             f"peft's mixed batches refuse it too): merge it into the base (python -m minicalm merge) "
                             f"and serve the merged model")
        if cfg.residual:
            raise ValueError(f"adapter {name}: init {cfg.init} changes the base weights, which every row shares; save "
                             f"it as a plain LoRA of the original base (minicalm's save_adapter does)")
    targets = tuple(sorted({t for cfg, _ in adapters.values() for t in cfg.targets}))
    layers = adaptable(model, targets)
    for name, (cfg, factors) in adapters.items():
        missing = sorted(set(adaptable(model, cfg.targets)) - set(factors))
        if missing:
            raise ValueError(f"adapter {name}: missing {len(missing)} of its target layers, e.g. {missing[0]!r}")
        for module, (A, B) in factors.items():
            base = layers.get(module)
            if base is None or (A.shape[1], B.shape[0]) != (base.in_features, base.out_features):
                have = "has no such layer" if base is None else f"has {base.out_features} x {base.in_features} there"
                raise ValueError(f"adapter {name}: {module} with A {tuple(A.shape)} and B {tuple(B.shape)}: the model "
                                 f"{have}")
    r = max(cfg.r for cfg, _ in adapters.values())
    for module, base in layers.items():
        dev = base.weight.device
        A = torch.zeros(len(adapters) + 1, r, base.in_features, device=dev)
        B = torch.zeros(len(adapters) + 1, base.out_features, r, device=dev)
        for i, (cfg, factors) in enumerate(adapters.values(), 1):
            if module in factors:   # else the adapter leaves this layer alone: zeros
                a, b = factors[module]
                A[i, :cfg.r], B[i, :, :cfg.r] = a, b.float() * cfg.scaling
        model.set_submodule(module, MultiLoRALinear(base, A, B))
    model.requires_grad_(False)
    return list(adapters)


def multi_lora_layers(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


@contextmanager
def row_adapters(model: nn.Module, rows: torch.Tensor):
    """Run the block with row i of every batch on adapter rows[i] (0: the base), rows (B,) on the model's device."""
    layers = multi_lora_layers(model)
    for m in layers:
        m.rows = rows
    try:
        yield model
    finally:
        for m in layers:
            m.rows = None
