"""LoRA: a trainable low-rank update beside each frozen nn.Linear, injected into an already loaded model.

    h = W x + b + (alpha / r) * B A x      W (out x in) frozen;  A (r x in), B (out x r) trained

The five steps: `apply_lora` swaps the chosen nn.Linears for LoRALinear and freezes everything else; train (only
lora_A / lora_B get gradients); `save_adapter` writes PEFT's on-disk format, which `load_adapter` (or
peft.PeftModel.from_pretrained) reads back; `merge_lora` folds B A into W; `save_merged` writes a plain checkpoint.

Dtype policy: the frozen base keeps its dtype (bf16 on a GPU, fp32 on CPU); the adapter parameters are always
fp32 so that small optimizer updates are not rounded away. Forward runs in the base dtype: A and B are cast to x's
dtype on the fly (the cast is differentiable; gradients land in the fp32 parameters). merge() / unmerge() compute
the delta B A in fp32 and round once to the weight's dtype.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .model import CalmForCausalLM
from .weights import atomic_write, read_tensors, save_checkpoint

VALID_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
LORA_KEYS = (".lora_A.weight", ".lora_B.weight")
PEFT_PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the causal LM)
# PEFT settings that change the math; an adapter using any of them is refused rather than loaded wrongly.
UNSUPPORTED = ("bias", "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
               "modules_to_save", "layers_to_transform", "layer_replication", "exclude_modules", "target_parameters",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank path; it starts equal to the base layer because B is zero.

        x ──┬──────────── W x + b ───────────────────────────────┐
            └─ dropout ─> A (r x in) ─> B (out x r) ─> * alpha/r ─(+)─> h

    `weight` / `bias` are the base layer's own Parameters, so the base state-dict keys do not change; the adapter
    adds `lora_A.weight` and `lora_B.weight`, the names PEFT saves. merge() adds scaling * B A into `weight` and
    unmerge() subtracts it again. Nothing else is stored, so unmerge restores W to rounding (fp32: ~1e-7 relative;
    bf16: one rounding of the merged weight) and A, B must not change while merged. `disabled` runs the base alone.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)          # the same Parameter: no copy, same key
        self.register_parameter("bias", base.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        fp32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **fp32)
        self.lora_B = nn.Linear(r, self.out_features, **fp32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as PEFT does
        nn.init.zeros_(self.lora_B.weight)                             # B A = 0: the model starts unchanged
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = self.disabled = False
        self.train(base.training)   # new submodules default to train mode; follow the layer we replace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            raise RuntimeError("LoRALinear is merged, so it cannot run with the adapter disabled: unmerge() first")
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:   # merged: B A is already inside weight
            return y
        A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """scaling * B A, (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _check(r, targets, source: str = "apply_lora") -> tuple[str, ...]:
    """Validate r and the target names; return the targets as a tuple in VALID_TARGETS order."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    unknown = [t for t in targets if t not in VALID_TARGETS]
    if unknown or not targets:
        raise ValueError(f"{source}: unknown LoRA targets {unknown or targets}; valid targets: {list(VALID_TARGETS)}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{source}: LoRA rank r must be a positive integer, got {r!r}")
    return tuple(t for t in VALID_TARGETS if t in targets)


def _find(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    # Match the last name component exactly, as PEFT's suffix match does: `dense` is attention.dense only.
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and n.rpartition(".")[2] in targets]


def apply_lora(model: nn.Module, targets=("query_key_value",), r: int = 8, alpha: float = 16,
               dropout: float = 0.05) -> nn.Module:
    """Swap every nn.Linear named `*.<target>` for a LoRALinear and freeze all other parameters."""
    targets = _check(r, targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA layers")
    found = _find(model, targets)
    if not found:
        raise ValueError(f"apply_lora: no nn.Linear in the model is named like {list(targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linear, r, alpha, dropout))
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets)   # read by save_adapter
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line, as a string."""
    t, n = trainable_parameters(model)
    return f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}"


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone inside the block (e.g. reference logits); the adapters come back after."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
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
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    return model


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as peft 0.21 saves them (keys without `.default`)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().float().contiguous().cpu()
               for k, v in model.state_dict().items() if k.endswith(LORA_KEYS)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
              "lora_dropout": cfg["dropout"], "target_modules": list(cfg["targets"]),
              "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None}
    # weights first, config last: a folder with a config is a complete adapter
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, name_or_path: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter, applying LoRA first if the model has none (a model that has LoRA keeps its own
    dropout). Everything is checked before the model is touched: a bad adapter raises ValueError, model unchanged."""
    cfg_file, w_file = Path(adapter_dir) / "adapter_config.json", Path(adapter_dir) / "adapter_model.safetensors"
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; a PEFT adapter folder holds adapter_config.json and "
                                    f"adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    bad = {k: cfg[k] for k in UNSUPPORTED if cfg.get(k) not in (None, False, "none", {}, [])}
    if bad:
        raise ValueError(f"{cfg_file}: uses PEFT settings minicalm's LoRA does not implement: {bad}")
    r, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha", 8), cfg.get("lora_dropout", 0.0)   # peft's defaults
    targets = _check(r, cfg.get("target_modules"), source=str(cfg_file))
    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise ValueError(f"load_adapter({adapter_dir}): the model's LoRA is merged; unmerge_lora(model) first")
    have = getattr(model, "lora_config", None)
    if have is not None and (have["r"], have["alpha"], have["targets"]) != (r, alpha, targets):
        raise ValueError(f"{cfg_file}: adapter has r={r}, alpha={alpha}, targets={list(targets)}; the model's LoRA "
                         f"has r={have['r']}, alpha={have['alpha']}, targets={list(have['targets'])}")
    expected = {}
    for name, m in _find(model, targets):
        expected[name + LORA_KEYS[0]], expected[name + LORA_KEYS[1]] = (r, m.in_features), (m.out_features, r)
    state = {}
    for key, t in read_tensors(w_file):
        name = key.removeprefix(PEFT_PREFIX)
        if not key.startswith(PEFT_PREFIX) or name not in expected:
            raise ValueError(f"{w_file}: unexpected tensor {key!r} (targets {list(targets)}, r={r})")
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{w_file}: tensor {key!r} has shape {tuple(t.shape)}, the model needs {expected[name]}")
        state[name] = t
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{w_file}: missing {len(missing)} tensors, e.g. {PEFT_PREFIX + missing[0]!r}")
    saved, own = cfg.get("base_model_name_or_path"), name_or_path or getattr(model, "name_or_path", None)
    if saved and own and str(saved) != str(own):
        warnings.warn(f"{cfg_file}: adapter was trained on {saved!r}, loading it into {own!r}", stacklevel=2)
    if have is None:
        apply_lora(model, targets, r, alpha, dropout)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)   # to the adapter's fp32 and device
    return model


def save_merged(model: CalmForCausalLM, out_dir: str | os.PathLike,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Merge every adapter (the model stays merged) and write a plain GPT-NeoX checkpoint via save_checkpoint."""
    merge_lora(model)
    with torch.device("meta"):
        plain = CalmForCausalLM(model.config)
    # A LoRA-free model sharing the merged tensors under their original names (no copy of the weights).
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(LORA_KEYS)}
    plain.load_state_dict(state, strict=True, assign=True)
    return save_checkpoint(plain, out_dir, tokenizer_dir)
