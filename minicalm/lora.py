"""LoRA (Hu et al. 2021, arXiv 2106.09685): a trainable low-rank update beside each frozen linear layer.

    h = W x + b + s B A x      W (out x in) frozen;  A (r x in), B (out x r) trained;  s = alpha / r

`apply_lora(model, LoraConfig(...))` wraps the chosen linear layers of an already loaded model in LoRALinear and
freezes everything else, so that training updates A and B only (and DoRA's magnitudes, below); `merge_lora` folds
s B A into W for inference. The settings are a LoraConfig (config.py). DoRA is a layer of its own (DoRALinear, here);
the other variants are initialisations (PiSSA, OLoRA, Gaussian), an optimizer setting (LoRA+) and a scale (rsLoRA):
variants.py. The adapter's files, in PEFT's format: io/adapter.py. A and B are fp32 parameters whatever the base's
dtype (train.py states the dtype policy).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LoraConfig
from .model import BLOCK_LINEAR
from .variants import init_lora


class LoRALinear(nn.Module):
    """A frozen base layer plus a low-rank path; it starts equal to the base because B is zero.

        x ──┬── base_layer ── W x + b ─────────────────────────┐
            └─ dropout ─> A (r x in) ─> B (out x r) ─> * s ──(+)─> h

    `base_layer` is the layer it adapts, called as it is: an nn.Linear, or any frozen layer with in_features,
    out_features, a bias and dequantize() (a quantized base: nf4.NF4Linear). Its tensors keep their own state-dict keys
    (`weight`, `bias`, not `base_layer.weight`), so a model's state dict and a merged checkpoint read the same with or
    without LoRA; the adapter adds `lora_A.weight` and `lora_B.weight`, the names PEFT saves. merge() folds s B A into
    the base's weight and unmerge() takes it out again (to rounding: fp32 ~1e-7 relative; bf16 one rounding of the
    merged weight), so A and B must not change while merged; a quantized base cannot hold the merged weight, so a
    dense layer carries it while merged and unmerge() brings the quantized one back. `disabled` runs the base alone.
    """

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base.requires_grad_(False)
        self.config, self.r, self.scaling = config, config.r, config.scaling
        fp32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, self.r, **fp32)
        self.lora_B = nn.Linear(self.r, self.out_features, **fp32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT does
        nn.init.zeros_(self.lora_B.weight)                             # B A = 0: the model starts unchanged
        self.lora_dropout = nn.Dropout(config.dropout)
        # PiSSA's and OLoRA's first A and B, whose product init_lora moved out of the base (a residual base): saving
        # converts the adapter for the original base with them (io/adapter.py). None for every other init.
        self.register_buffer("lora_A0", None, persistent=False)
        self.register_buffer("lora_B0", None, persistent=False)
        self.quantized_base: nn.Module | None = None   # a quantized base, set aside while a dense layer holds the merge
        self.merged = self.disabled = False
        self.register_state_dict_post_hook(base_keys_out)
        self.register_load_state_dict_pre_hook(base_keys_in)
        self.train(base.training)   # new submodules default to train mode; follow the layer we wrap

    weight = property(lambda self: self.base_layer.weight)   # the base's, as a plain layer's would be
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            raise RuntimeError("LoRALinear is merged, so it cannot run with the adapter disabled: unmerge() first")
        y = self.base_layer(x)                 # W x + b
        if self.merged or self.disabled:       # merged: s B A is inside W already
            return y
        return y + self.update(x)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s B A dropout(x). s scales B (out x r), not the (B, T, out) product: the same update, less work."""
        A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)   # differentiable casts
        return F.linear(F.linear(self.lora_dropout(x), A), B * self.scaling)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """s B A, (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_weight(self) -> torch.Tensor:
        """The base's (out, in) weight as a dense tensor: nn.Linear's own, or a quantized layer's dequantize()."""
        base = self.base_layer
        return base.weight if isinstance(base, nn.Linear) else base.dequantize()

    def merged_weight(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta()

    def unmerged_weight(self, W: torch.Tensor) -> torch.Tensor:
        return W - self.delta()

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A, computed in fp32 and rounded once to the base's dtype. Idempotent."""
        if self.merged:
            return
        W = self.base_weight()
        merged = self.merged_weight(W.float()).to(W.dtype)
        if isinstance(self.base_layer, nn.Linear):
            self.base_layer.weight.copy_(merged)
        else:   # a quantized base cannot hold W + s B A: a dense layer does, and the quantized one waits for unmerge
            dense = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            dense.weight, dense.bias = nn.Parameter(merged, requires_grad=False), self.base_layer.bias   # no copies
            self.quantized_base, self.base_layer = self.base_layer, dense
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.quantized_base is not None:
            self.base_layer, self.quantized_base = self.quantized_base, None
        else:
            W = self.base_layer.weight
            W.copy_(self.unmerged_weight(W.float()))
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, " \
               f"merged={self.merged}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, arXiv 2402.09353): a learned length m per output row, LoRA for the direction.

        W' = m * (W + s B A) / n          n = ||W + s B A|| per output row, a constant in backward (section 4.3)
        h  = (m / n) * (W x + s B A x) + b

    m (`lora_magnitude_vector`, (out,) fp32, PEFT's name) starts at n, so the layer starts unchanged. W x is the
    base's own output, reused (h - b); PEFT, with dropout active in training, applies W to the dropped input for the
    rescaling instead: the same with dropout 0, and at evaluation.
    """

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__(base, config)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self.register_buffer("merged_norm", None, persistent=False)   # n at merge time (unmerge needs it)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ||W + s B A|| of each output row, (out,) fp32, without forming the (out, in) sum:
        ||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i (A w_i) + s^2 b_i (A A^T) b_i^T, from W A^T (out, r), A A^T (r, r)."""
        W, A, B, s = self.base_weight(), self.lora_A.weight, self.lora_B.weight.float(), self.scaling
        WA = (W @ A.to(W.dtype).T).float()                                     # (out, r): each row's A w_i
        sq = W.float().square().sum(1) + 2 * s * (B * WA).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return sq.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return super().forward(x)
        y, bias = self.base_layer(x), self.base_layer.bias
        scale = (self.lora_magnitude_vector / self.weight_norm()).to(y.dtype)   # m / n, (out,)
        if bias is None:
            return scale * (y + self.update(x))
        return scale * (y - bias + self.update(x)) + bias

    def merged_weight(self, W: torch.Tensor) -> torch.Tensor:
        self.merged_norm = self.weight_norm()   # of the unmerged W
        return (self.lora_magnitude_vector.float() / self.merged_norm)[:, None] * (W + self.delta())

    def unmerged_weight(self, W: torch.Tensor) -> torch.Tensor:
        return W / (self.lora_magnitude_vector.float() / self.merged_norm)[:, None] - self.delta()


def apply_lora(model: nn.Module, config: LoraConfig | None = None, **settings) -> nn.Module:
    """Wrap each of the blocks' linear layers named by config.targets in a LoRALinear (a DoRALinear with use_dora),
    initialise it as config.init says, and freeze every other parameter. The settings as a LoraConfig, or by name as
    LoraConfig spells them: `apply_lora(model, targets=("query_key_value",), r=8, alpha=16, dropout=0.05)` (PEFT's
    lora_alpha, lora_dropout, target_modules and init_lora_weights are alpha, dropout, targets and init here; the
    adapter files keep PEFT's names, io/adapter.py). A target is the layer's last name, as PEFT matches it: `dense` is
    attention.dense only."""
    if config is None:
        names = [f.name for f in dataclasses.fields(LoraConfig)]
        unknown = [k for k in settings if k not in names]
        if unknown:
            raise TypeError(f"apply_lora: no setting {unknown[0]!r}; LoRA's settings are LoraConfig's: "
                            f"{', '.join(names)}")
        config = LoraConfig(**settings)
    elif settings or not isinstance(config, LoraConfig):
        raise TypeError("apply_lora(model, config): config is a LoraConfig; or give the settings by name, "
                        "apply_lora(model, targets=..., r=..., alpha=...)")
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    found = adaptable(model, config.targets)
    if not found:
        raise ValueError(f"apply_lora: the model has no block layer named like {list(config.targets)}")
    narrow = min(min(m.in_features, m.out_features) for m in found.values())
    if config.r > narrow:   # legal, but not what anyone means
        warnings.warn(f"apply_lora: r {config.r} exceeds a target layer's smaller side ({narrow}); its update's rank "
                      f"is at most {narrow}, so the extra rank adds parameters and learns nothing new", stacklevel=2)
    quantized = next((n for n, m in found.items() if not isinstance(m, nn.Linear)), None)
    if config.residual and quantized:
        raise ValueError(f"apply_lora: init {config.init} decomposes a dense weight; {quantized} is quantized")
    model.requires_grad_(False)
    layer = DoRALinear if config.use_dora else LoRALinear
    for name, base in found.items():
        adapted = layer(base, config)
        init_lora(adapted, config.init)   # PiSSA and OLoRA also turn the base weight into the residual W - s B A
        model.set_submodule(name, adapted)
    return model


def adaptable(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Module]:
    """The blocks' linear layers named by `targets` (dense or quantized), by name."""
    return {n: m for n, m in model.named_modules() if (hit := BLOCK_LINEAR.fullmatch(n)) and hit[2] in targets}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_config(model: nn.Module) -> LoraConfig | None:
    """The LoraConfig a model's LoRA layers were made with (apply_lora gives them all the same); None without LoRA."""
    return next((m.config for m in lora_layers(model).values()), None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold s B A into every LoRA layer's weight (idempotent). Undo with unmerge_lora."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone inside the block (e.g. reference logits); the adapters come back after."""
    layers = list(lora_layers(model).values())
    if any(m.lora_A0 is not None for m in layers):
        raise ValueError("the base of a PiSSA/OLoRA model is the residual W - s B A, not the original model: load "
                         "the saved adapter onto the original base to compare the two")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters once; a weight stored in another form (a module with its
    own numel(): nf4.NF4Weight) counts the weights it stands for."""
    params = list(model.parameters())
    stored = sum(m.numel() for m in model.modules() if callable(getattr(m, "numel", None)))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + stored


def trainable_summary(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line, as a string."""
    t, n = trainable_parameters(model)
    return f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}"


# ----------------------------------------------------------------------------- the base's own state-dict keys

def base_keys_out(module: LoRALinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict(): the base's tensors under the layer's own name (`...query_key_value.weight`)."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def base_keys_in(module: LoRALinear, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict(): the same keys back into base_layer."""
    for name in module.base_layer.state_dict(keep_vars=True):
        if prefix + name in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)
