"""LoRA's variants, each a few lines beside the plain method (lora.py), under PEFT's names so that files round-trip.

  rsLoRA  s = alpha / sqrt(r) instead of alpha / r: the update's scale no longer shrinks as r grows
          (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732)
  DoRA    W' = m * (W + s B A) / ||W + s B A||_row: a learned length m per output row, LoRA for the direction;
          the norm is treated as a constant in backward (Liu et al. 2024, arXiv 2402.09353, sections 3-4.3)
  PiSSA   W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); the frozen base becomes W - s B A
          (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", arXiv 2404.02948)
  OLoRA   W = Q R; A = R[:r], B = Q[:, :r]; the frozen base becomes W - s B A
          (Buyukakyuz 2024, "Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775)
  LoRA+   B (and every 1-D trainable parameter, DoRA's m) learns at lr x ratio, A at lr
          (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354)

lora.py calls these; they touch a LoRALinear only through its weight, lora_A, lora_B, scaling and the two
attributes they own (lora_magnitude_vector, the initial A0 / B0 of a residual base).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .nf4 import dense

INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")   # init_lora_weights; True is "default"


def check_init(init, use_dora: bool = False, quantized: bool = False):
    """PEFT's init_lora_weights (True, "gaussian", "pissa", "pissa_niter_K", "olora"), checked; "default" is True."""
    init = True if init in (True, "default", "true") else init
    niter = isinstance(init, str) and init.startswith("pissa_niter_") and init.removeprefix("pissa_niter_").isdigit()
    if init not in (True, "gaussian", "pissa", "olora") and not niter:
        raise ValueError(f"LoRA init (--lora-init) {init!r}: expected one of {', '.join(INITS)} (K a number of "
                         f"iterations)")
    if use_dora and residual_init(init):
        raise ValueError(f"DoRA with --lora-init {init}: an adapter on a residual base cannot be saved for the "
                         f"original base (the conversion to a plain LoRA does not hold for DoRA's norms)")
    if quantized and residual_init(init):
        raise ValueError(f"--lora-init {init} decomposes a dense base weight, not an NF4 one (--quantize nf4)")
    return init


def check_original_base(layers) -> None:
    """Refuse to run the base alone where PiSSA or OLoRA left a residual in it instead of the original weights."""
    if any(hasattr(m, "lora_A0") for m in layers):
        raise ValueError("the base of a PiSSA/OLoRA model is the residual W - s B A, not the original model: load "
                         "the saved adapter onto the original base to compare the two")


def residual_init(init) -> bool:
    """Whether the init moves part of W into the adapter (PiSSA, OLoRA), leaving a residual base."""
    return isinstance(init, str) and init.startswith(("pissa", "olora"))


@torch.no_grad()
def init_lora(layer: nn.Module, init) -> None:
    """Set A and B as `init` says. True keeps the layer's own (A Kaiming-uniform, B zero: B A = 0)."""
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if init == "gaussian":   # PEFT's: A ~ N(0, 1/r^2), B zero
        nn.init.normal_(A, std=1 / A.shape[0])
    elif residual_init(init):
        W = layer.weight.float()                               # (out, in), decomposed in fp32
        r, s = A.shape[0], layer.scaling
        if init == "olora":
            Q, R = torch.linalg.qr(W)                          # (out, k), (k, in)
            B_, A_ = Q[:, :r], R[:r]
        else:   # PiSSA: the top-r singular triplets, their values shared between A and B and divided by s
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:   # pissa_niter_K: a randomized SVD, K subspace iterations
                U, S, V = torch.svd_lowrank(W, r, niter=int(init.removeprefix("pissa_niter_")))
                Vh = V.T
            root = (S / s).sqrt()
            B_, A_ = U * root, root[:, None] * Vh              # (out, r), (r, in)
        A.copy_(A_), B.copy_(B_)
        layer.weight.copy_((W - s * B_ @ A_).to(layer.weight.dtype))   # the residual base, in memory only
        layer.register_buffer("lora_A0", A_.clone(), persistent=False)   # for saving against the original base
        layer.register_buffer("lora_B0", B_.clone(), persistent=False)
    elif init is not True:
        raise ValueError(f"unknown LoRA init {init!r}")
    layer.init_lora_weights = init


def add_dora(layer: nn.Module) -> None:
    """DoRA's magnitude m, (out,) fp32, starting at the row norms of W + s B A: the layer starts unchanged."""
    layer.lora_magnitude_vector = nn.Parameter(dora_norm(layer))


@torch.no_grad()
def dora_norm(layer: nn.Module) -> torch.Tensor:
    """||W + s B A|| of each output row, (out,) fp32, without forming the (out, in) sum:
    ||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i (A w_i) + s^2 b_i (A A^T) b_i^T, with W A^T (out, r) and A A^T (r, r).
    Detached: DoRA treats it as a constant in backward (section 4.3)."""
    W, A, B, s = dense(layer.weight), layer.lora_A.weight, layer.lora_B.weight.float(), layer.scaling
    WA = W @ A.to(W.dtype).T                                  # (out, r): each row's A w_i
    sq = W.float().square().sum(1) + 2 * s * (B * WA.float()).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    return sq.clamp_min(0).sqrt()


def dora_forward(layer: nn.Module, y: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """m / n * (W x + s B A x) + b, from the base output y = W x + b and the LoRA path's s B A x (dropout on its
    input only): W x is reused, not recomputed. (PEFT, with dropout active in training, applies W to the dropped
    input for the rescaling term instead; with dropout 0, and at evaluation, the two are the same.)"""
    scale = (layer.lora_magnitude_vector / dora_norm(layer)).to(y.dtype)   # (out,)
    bias = 0 if layer.bias is None else layer.bias
    return scale * (y - bias + lora) + bias


@torch.no_grad()
def dora_merge(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """The merged weight (m / n) (W + s B A) in fp32; n is kept for unmerge (it depends on the unmerged W)."""
    layer.dora_merged_norm = dora_norm(layer)
    return (layer.lora_magnitude_vector.float() / layer.dora_merged_norm)[:, None] * (W + layer.delta())


@torch.no_grad()
def dora_unmerge(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    return W / (layer.lora_magnitude_vector.float() / layer.dora_merged_norm)[:, None] - layer.delta()


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups as peft.optimizers.create_loraplus_optimizer makes them: A at lr; B and 1-D trainable
    parameters (DoRA's m) at lr x ratio, the 1-D ones without weight decay. "lr_ratio" lets a schedule scale both."""
    a, b, flat = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (flat if p.ndim == 1 else b if "lora_B" in name else a).append(p)
    return [{"params": a, "lr": lr, "lr_ratio": 1.0, "weight_decay": weight_decay},
            {"params": b, "lr": lr * ratio, "lr_ratio": ratio, "weight_decay": weight_decay},
            {"params": flat, "lr": lr * ratio, "lr_ratio": ratio, "weight_decay": 0.0}]


def as_plain_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, alpha: float,
                  use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An adapter trained on a residual base (W - s B0 A0) as a plain LoRA of the original W (PEFT's conversion):
    W - s B0 A0 + s B A = W + s [B, -B0] [A; A0], of rank 2r, alpha doubled (x sqrt 2 with rsLoRA) to keep s."""
    return torch.cat((A, A0), 0), torch.cat((B, -B0), 1), alpha * (math.sqrt(2) if use_rslora else 2)
