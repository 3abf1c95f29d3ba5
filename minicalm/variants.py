"""LoRA's variants beside the plain method (lora.py), under PEFT's names so that adapter files cross both ways:

  rsLoRA  s = alpha / sqrt(r) instead of alpha / r: the update's scale no longer shrinks as r grows
          (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732)
          -> LoraConfig.scaling (config.py)
  DoRA    W' = m * (W + s B A) / ||W + s B A||_row: a learned length m per output row, LoRA for the direction
          (Liu et al. 2024, arXiv 2402.09353) -> lora.DoRALinear, a layer of its own
  Gaussian A ~ N(0, 1/r^2), B zero (PEFT's "gaussian") -> init_lora
  PiSSA   W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s); the frozen base becomes W - s B A
          (Meng et al. 2024, "Principal Singular values and Singular vectors Adaptation", arXiv 2404.02948) -> init_lora
  OLoRA   W = Q R; A = R[:r], B = Q[:, :r]; the frozen base becomes W - s B A
          (Buyukakyuz 2024, "Orthonormal Low-Rank Adaptation of Large Language Models", arXiv 2406.01775) -> init_lora
  LoRA+   B (and every 1-D trainable parameter, DoRA's m) learns at lr x ratio, A at lr
          (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354)
          -> loraplus_groups

An init here sets a LoRALinear's declared tensors: lora_A, lora_B, and for a residual base the base's weight and the
first A and B (lora_A0, lora_B0), which saving needs (as_plain_lora).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def init_lora(layer: nn.Module, init: str) -> None:
    """Set a LoRALinear's A and B as `init` says (a LoraConfig.init); "default" keeps its own (Kaiming A, zero B).
    PiSSA and OLoRA move the top-r part of W into the adapter: the base weight becomes the residual W - s B A (in
    memory only; the checkpoint on disk is never written)."""
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if init == "gaussian":
        nn.init.normal_(A, std=1 / A.shape[0])
    elif init.startswith(("pissa", "olora")):
        W = layer.base_layer.weight                           # (out, in), decomposed in fp32
        B_, A_ = residual_factors(W.float(), A.shape[0], layer.scaling, init)
        A.copy_(A_), B.copy_(B_)
        W.copy_((W.float() - layer.scaling * B_ @ A_).to(W.dtype))
        layer.lora_A0, layer.lora_B0 = A_.clone(), B_.clone()


def residual_factors(W: torch.Tensor, r: int, s: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with s B A the top-r part of W: its QR (OLoRA), its SVD (PiSSA: the singular values,
    divided by s, shared between A and B), or a randomized SVD with K subspace iterations (pissa_niter_K)."""
    if init == "olora":
        Q, R = torch.linalg.qr(W)                             # (out, k), (k, in)
        return Q[:, :r], R[:r]
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, r, niter=int(init.removeprefix("pissa_niter_")))
        Vh = V.T
    root = (S / s).sqrt()
    return U * root, root[:, None] * Vh


def as_plain_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, alpha: float,
                  use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """An adapter trained on a residual base (W - s B0 A0) as a plain LoRA of the original W (PEFT's conversion):
    W - s B0 A0 + s B A = W + s [B, -B0] [A; A0], of rank 2r, alpha doubled (x sqrt 2 with rsLoRA) to keep s."""
    return torch.cat((A, A0), 0), torch.cat((B, -B0), 1), alpha * (math.sqrt(2) if use_rslora else 2)


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups as peft.optimizers.create_loraplus_optimizer makes them: A at lr; B and the 1-D
    trainable parameters (DoRA's m) at lr x ratio, the 1-D ones without weight decay. A schedule that scales each
    group's initial lr (torch's LambdaLR, train.py) keeps the ratio."""
    a, b, flat = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (flat if p.ndim == 1 else b if "lora_B" in name else a).append(p)
    return [{"params": a, "lr": lr, "weight_decay": weight_decay},
            {"params": b, "lr": lr * ratio, "weight_decay": weight_decay},
            {"params": flat, "lr": lr * ratio, "weight_decay": 0.0}]
