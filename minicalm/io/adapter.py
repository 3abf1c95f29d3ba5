"""LoRA adapters on disk, in PEFT's format: peft.PeftModel.from_pretrained reads minicalm's, and minicalm reads peft's.

An adapter folder holds two files (peft 0.21 writes them so):

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                 "target_modules": ["query_key_value"], "use_dora": false, "use_rslora": false,
                                 "init_lora_weights": true, "base_model_name_or_path": ..., "revision": ...}
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in), ...lora_B.weight (out, r)
                                and with DoRA ...lora_magnitude_vector (out,)

`<module>` is the adapted layer's name in the model (gpt_neox.layers.0.attention.query_key_value); peft drops its
adapter name ("default") when saving. `base_model_name_or_path` and `revision` say which checkpoint the adapter was
trained on: evaluation, merging and the inspector load that base by default. An adapter trained on PiSSA's or
OLoRA's residual base is saved as a plain LoRA of the original base (rank 2r, variants.as_plain_lora), as peft's
`path_initial_model_for_weight_conversion` saves it, so that it applies to the checkpoint users have.
PEFT's names for LoRA's settings and minicalm's LoraConfig meet in one place: PEFT_NAMES, with peft_config and
lora_config_from_peft beside it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..config import POST_MODEL, LoraConfig, SettingError
from ..lora import adaptable, apply_lora, lora_config, lora_layers, merge_lora
from ..model import CalmForCausalLM
from ..multi_lora import add_adapters
from ..nf4 import NF4Linear
from ..variants import as_plain_lora
from .files import atomic_write, read_json, write_json
from .weights import check_finite, read_tensors, save_checkpoint

PEFT_PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the causal LM)
LORA_KEYS = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")   # A, B, and DoRA's m
# LoraConfig's fields and PEFT's adapter_config.json keys for them: the one translation between the two.
PEFT_NAMES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
              "use_dora": "use_dora", "use_rslora": "use_rslora", "init": "init_lora_weights"}
PEFT_DEFAULTS = {"lora_alpha": 8, "lora_dropout": 0.0}   # peft's LoraConfig defaults, for keys a file leaves out
# PEFT settings that change the math; an adapter using any of them is refused rather than loaded wrongly.
UNSUPPORTED = ("bias", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "layer_replication", "exclude_modules", "target_parameters",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora")


def peft_config(config: LoraConfig, base: str | None, revision: str | None) -> dict:
    """adapter_config.json for a LoraConfig, as peft 0.21 writes it."""
    d = {theirs: getattr(config, ours) for ours, theirs in PEFT_NAMES.items()}
    d |= {"target_modules": list(config.targets), "init_lora_weights": True if config.init == "default" else config.init}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", **d, "base_model_name_or_path": base, "revision": revision,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}


def lora_config_from_peft(d: dict, source: str) -> LoraConfig:
    """A LoraConfig from adapter_config.json's contents, checked; a bad value is named by its PEFT key."""
    d = PEFT_DEFAULTS | d
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}, only 'LORA' is supported")
    bad = {k: d[k] for k in UNSUPPORTED if d.get(k) not in (None, False, "none", {}, [])}
    if bad:
        raise ValueError(f"{source}: uses PEFT settings minicalm's LoRA does not implement: {bad}")
    given = {ours: d[theirs] for ours, theirs in PEFT_NAMES.items() if d.get(theirs) is not None}
    if given.get("init") is True:   # PEFT's init_lora_weights=true: its default init (Kaiming A, zero B)
        given["init"] = "default"
    try:
        return LoraConfig(**{"r": d.get("r"), "targets": d.get("target_modules")} | given)
    except SettingError as e:
        key = PEFT_NAMES[e.name]
        raise ValueError(f"{source}: {key} {d.get(key)!r}: {e.message}") from None


class Factors(NamedTuple):
    """One adapted layer's tensors as a file holds them."""
    A: torch.Tensor                   # (r, in)
    B: torch.Tensor                   # (out, r)
    magnitude: torch.Tensor | None    # (out,): DoRA's m; None for LoRA


class Adapter(NamedTuple):
    """An adapter folder's contents."""
    config: LoraConfig
    base: str | None                  # base_model_name_or_path: the checkpoint it was trained on
    revision: str | None
    factors: dict[str, Factors]       # by module name, in the file's order (empty from read_config)


def read_config(adapter_dir: str | os.PathLike) -> Adapter:
    """adapter_config.json, checked (a plain LoRA that minicalm implements), without the tensors."""
    folder = Path(adapter_dir)
    path = folder / "adapter_config.json"
    if not path.is_file():   # say what the folder is instead, and where the adapter is
        if (folder / "adapter" / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} is a training run's folder: its adapter is {folder / 'adapter'}")
        if (folder / "config.json").is_file() or (folder / "model" / "config.json").is_file():
            model = folder if (folder / "config.json").is_file() else folder / "model"
            raise FileNotFoundError(f"{folder} holds no adapter but a model checkpoint: pass {model} as --model")
        raise FileNotFoundError(f"{folder}: no adapter here (an adapter folder holds adapter_config.json and "
                                f"adapter_model.safetensors)")
    d = read_json(path, "a PEFT adapter's config")
    return Adapter(lora_config_from_peft(d, str(path)), d.get("base_model_name_or_path"), d.get("revision"), {})


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """The config and every module's tensors as stored (fp32), checked against each other."""
    adapter, file = read_config(adapter_dir), Path(adapter_dir) / "adapter_model.safetensors"
    cfg = adapter.config
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; an adapter folder holds adapter_config.json and "
                                f"adapter_model.safetensors")
    parts: dict[str, list] = {}
    for key, t in read_tensors(file):
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
        module = name.removesuffix(suffix or "")
        if not key.startswith(PEFT_PREFIX) or suffix is None or module.rpartition(".")[2] not in cfg.targets:
            raise ValueError(f"{file}: unexpected tensor {key!r} (targets {list(cfg.targets)})")
        check_finite(file, key, t)
        parts.setdefault(module, [None, None, None])[LORA_KEYS.index(suffix)] = t
    if not parts:
        raise ValueError(f"{file}: holds no LoRA tensors")
    for module, (A, B, m) in parts.items():
        check_factors(file, module, cfg, A, B, m)
    return adapter._replace(factors={module: Factors(*abm) for module, abm in parts.items()})


def check_factors(file: Path, module: str, cfg: LoraConfig, A, B, m) -> None:
    if A is None or B is None:
        raise ValueError(f"{file}: {module} has only one of lora_A and lora_B")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != cfg.r or B.shape[1] != cfg.r:
        raise ValueError(f"{file}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}; r={cfg.r} needs (r, in) "
                         f"and (out, r)")
    if (m is not None) != cfg.use_dora or (m is not None and tuple(m.shape) != (B.shape[0],)):
        have = "no lora_magnitude_vector" if m is None else f"a lora_magnitude_vector of {tuple(m.shape)}"
        raise ValueError(f"{file}: {module} has {have}, but use_dora is {cfg.use_dora} and B is {tuple(B.shape)}")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base: str | None = None,
                 revision: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as peft 0.21 saves them. `base` (a hub id or folder) and
    `revision` name the checkpoint the adapter belongs to, which evaluation and merging load by default. An adapter on
    PiSSA's or OLoRA's residual base is written as a plain LoRA of the original base (rank 2r; as_plain_lora)."""
    config = lora_config(model)
    if config is None:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    if base is None:
        warnings.warn("save_adapter: the adapter records no base model (its base_model_name_or_path is null): pass "
                      "base= (the hub id or folder the model was loaded from)", stacklevel=2)
    tensors, saved = {}, config
    for name, m in lora_layers(model).items():
        A, B = m.lora_A.weight.detach().float(), m.lora_B.weight.detach().float()
        if m.lora_A0 is not None:   # trained on a residual base: saved for the original one instead
            A, B, alpha = as_plain_lora(A, B, m.lora_A0, m.lora_B0, config.alpha, config.use_rslora)
            saved = dataclasses.replace(config, r=2 * config.r, alpha=alpha, init="default")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = A, B
        if config.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().float()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    # weights first, config last: a folder with a config is a complete adapter
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", peft_config(saved, None if base is None else str(base), revision))
    return out


def adapter_base(adapter_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision) recorded in an adapter's config: the checkpoint it was trained on."""
    adapter = read_config(adapter_dir)
    return adapter.base, adapter.revision


def base_for(adapter_dir: str | os.PathLike | None, model: str | None = None,
             revision: str | None = None) -> tuple[str, str | None]:
    """The checkpoint (model, revision) to load for an adapter: as given; else the one the adapter records, at its
    revision (a run trained on refs/pr/5 is evaluated on refs/pr/5, not on main); else the post's model."""
    saved, saved_revision = adapter_base(adapter_dir) if adapter_dir else (None, None)
    model = model or saved or POST_MODEL
    return model, revision if revision is not None or str(model) != str(saved) else saved_revision


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, base: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter (DoRA, rsLoRA included), applying LoRA first if the model has none (a model that has
    LoRA keeps its own dropout). An adapter saved for PiSSA's or OLoRA's residual base (init_lora_weights "pissa"...)
    is loaded as peft loads it: the residual is derived again from the model's (original) weights. Everything is
    checked before the model is touched: a bad adapter raises ValueError, model unchanged. A warning says when the
    adapter was trained on another base than `base` (the hub id or folder the model was loaded from), when given."""
    adapter, file = read_adapter(adapter_dir), Path(adapter_dir)
    want, have, layers = adapter.config, lora_config(model), lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError(f"load_adapter({adapter_dir}): the model's LoRA is merged; unmerge_lora(model) first")
    same = ("r", "alpha", "targets", "use_dora", "use_rslora")
    if have is not None and any(getattr(have, k) != getattr(want, k) for k in same):
        raise ValueError(f"{file}: adapter has {format_settings(want)}; the model's LoRA has {format_settings(have)}")
    slots = {n: m.base_layer for n, m in layers.items()} or adaptable(model, want.targets)
    for name, f in adapter.factors.items():
        m = slots.get(name)
        if m is None:
            raise ValueError(f"{file}: adapts {name!r}, which the model does not have (or is not a "
                             f"{list(want.targets)} layer)")
        if (f.A.shape[1], f.B.shape[0]) != (m.in_features, m.out_features):
            raise ValueError(f"{file}: {name} has A {tuple(f.A.shape)} and B {tuple(f.B.shape)}; the model's layer is "
                             f"{m.out_features} x {m.in_features}")
    missing = sorted(set(slots) - set(adapter.factors))
    if missing:
        raise ValueError(f"{file}: missing {len(missing)} adapted layers, e.g. {missing[0]!r}")
    if adapter.base and base and str(adapter.base) != str(base):
        warnings.warn(f"{file}: adapter was trained on {adapter.base!r}, loading it into {base!r}", stacklevel=2)
    if have is None:
        apply_lora(model, want)
    with torch.no_grad():
        for name, m in lora_layers(model).items():   # to the adapter's fp32 and device
            m.lora_A.weight.copy_(adapter.factors[name].A), m.lora_B.weight.copy_(adapter.factors[name].B)
            if want.use_dora:
                m.lora_magnitude_vector.copy_(adapter.factors[name].magnitude)
    return model


def load_adapters(model: nn.Module, adapter_dirs: dict[str, str | os.PathLike]) -> list[str]:
    """Several adapters on one base at once, each row of a batch on its own (multi_lora.py): {name: folder}. Returns the
    names in index order, from 1 (0 is the base). The model is unchanged if any adapter is refused."""
    adapters = {}
    for name, folder in adapter_dirs.items():
        a = read_adapter(folder)
        adapters[name] = (a.config, {module: (f.A, f.B) for module, f in a.factors.items()})
    return add_adapters(model, adapters)


def format_settings(c: LoraConfig) -> str:
    return f"r={c.r}, alpha={c.alpha}, targets={list(c.targets)}" + ", DoRA" * c.use_dora + ", rsLoRA" * c.use_rslora


def save_merged(model: CalmForCausalLM, out_dir: str | os.PathLike,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Merge every adapter (the model stays merged) and write a plain GPT-NeoX checkpoint via save_checkpoint, with
    the base's own keys; the layers still in NF4 (not adapted) are written dense, in their compute dtype."""
    merge_lora(model)
    with torch.device("meta"):
        plain = CalmForCausalLM(model.config)
    keys = plain.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in keys}
    state |= {f"{n}.weight": m.dequantize() for n, m in model.named_modules()
              if isinstance(m, NF4Linear) and f"{n}.weight" in keys and f"{n}.weight" not in state}
    plain.load_state_dict(state, strict=True, assign=True)   # no copy of the weights
    return save_checkpoint(plain, out_dir, tokenizer_dir)
