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
"""
from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .config import POST_MODEL
from .files import atomic_write, read_json, write_json
from .lora import adaptable, apply_lora, check_targets, lora_layers, lora_settings, merge_lora
from .model import CalmForCausalLM
from .nf4 import NF4Weight
from .variants import as_plain_lora, check_init
from .weights import load_model, read_tensors, resolve, save_checkpoint

PEFT_PREFIX = "base_model.model."   # PeftModel.base_model (LoraModel) .model (the causal LM)
LORA_KEYS = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")   # A, B, and DoRA's m
PEFT_DEFAULTS = {"lora_alpha": 8, "lora_dropout": 0.0}   # LoraConfig's defaults, for keys a file leaves out
# PEFT settings that change the math; an adapter using any of them is refused rather than loaded wrongly.
UNSUPPORTED = ("bias", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "layer_replication", "exclude_modules", "target_parameters",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora")


class Factors(NamedTuple):
    """One adapted layer's tensors as a file holds them."""
    A: torch.Tensor                   # (r, in)
    B: torch.Tensor                   # (out, r)
    magnitude: torch.Tensor | None    # (out,): DoRA's m; None for LoRA


def read_config(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json, checked (a plain LoRA, a valid r and targets) and completed with PEFT's defaults;
    cfg["target_modules"] becomes a tuple in the block's order."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = PEFT_DEFAULTS | read_json(path, "a PEFT adapter's config; an adapter folder holds adapter_config.json "
                                          "and adapter_model.safetensors")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    bad = {k: cfg[k] for k in UNSUPPORTED if cfg.get(k) not in (None, False, "none", {}, [])}
    if bad:
        raise ValueError(f"{path}: uses PEFT settings minicalm's LoRA does not implement: {bad}")
    cfg["target_modules"] = check_targets(cfg.get("r"), cfg.get("target_modules"), source=str(path))
    cfg["use_dora"], cfg["use_rslora"] = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    try:
        cfg["init_lora_weights"] = check_init(cfg.get("init_lora_weights", True), cfg["use_dora"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def scaling_of(cfg: dict) -> float:
    """s of an adapter config: alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, Factors]]:
    """(read_config's config, {module name: Factors}) as stored (fp32), in the file's order."""
    cfg, file = read_config(adapter_dir), Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; an adapter folder holds adapter_config.json and "
                                f"adapter_model.safetensors")
    parts: dict[str, list] = {}
    for key, t in read_tensors(file):
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
        module = name.removesuffix(suffix or "")
        if not key.startswith(PEFT_PREFIX) or suffix is None or module.rpartition(".")[2] not in cfg["target_modules"]:
            raise ValueError(f"{file}: unexpected tensor {key!r} (targets {list(cfg['target_modules'])})")
        parts.setdefault(module, [None, None, None])[LORA_KEYS.index(suffix)] = t
    if not parts:
        raise ValueError(f"{file}: holds no LoRA tensors")
    for module, (A, B, m) in parts.items():
        check_factors(file, module, cfg, A, B, m)
    return cfg, {module: Factors(*abm) for module, abm in parts.items()}


def check_factors(file: Path, module: str, cfg: dict, A, B, m) -> None:
    r = cfg["r"]
    if A is None or B is None:
        raise ValueError(f"{file}: {module} has only one of lora_A and lora_B")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ValueError(f"{file}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}; r={r} needs (r, in) "
                         f"and (out, r)")
    if (m is not None) != cfg["use_dora"] or (m is not None and tuple(m.shape) != (B.shape[0],)):
        have = "no lora_magnitude_vector" if m is None else f"a lora_magnitude_vector of {tuple(m.shape)}"
        raise ValueError(f"{file}: {module} has {have}, but use_dora is {cfg['use_dora']} and B is {tuple(B.shape)}")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base: str | None, revision: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors as peft 0.21 saves them. `base` (a hub id or folder)
    and `revision` name the checkpoint the adapter belongs to. An adapter on PiSSA's or OLoRA's residual base is
    written as a plain LoRA of the original base (rank 2r; variants.as_plain_lora)."""
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r, alpha, init, tensors = settings["r"], settings["alpha"], settings["init_lora_weights"], {}
    for name, m in lora_layers(model).items():
        A, B = m.lora_A.weight.detach().float(), m.lora_B.weight.detach().float()
        if hasattr(m, "lora_A0"):   # trained on a residual base: against the original one instead
            A, B, alpha = as_plain_lora(A, B, m.lora_A0, m.lora_B0, settings["alpha"], settings["use_rslora"])
            r, init = 2 * settings["r"], True
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = A, B
        if m.lora_magnitude_vector is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().float()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": settings["dropout"], "target_modules": list(settings["targets"]),
              "base_model_name_or_path": None if base is None else str(base), "revision": revision, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": init,
              "use_rslora": settings["use_rslora"], "use_dora": settings["use_dora"], "modules_to_save": None}
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    # weights first, config last: a folder with a config is a complete adapter
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", config)
    return out


def adapter_base(adapter_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision) recorded in an adapter's config: the checkpoint it was trained on."""
    cfg = read_config(adapter_dir)
    return cfg.get("base_model_name_or_path"), cfg.get("revision")


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
    checked before the model is touched: a bad adapter raises ValueError, model unchanged. `base` names the model's
    checkpoint: a warning says when the adapter was trained on another."""
    cfg, factors = read_adapter(adapter_dir)
    file, targets = Path(adapter_dir), cfg["target_modules"]
    want = {"r": cfg["r"], "alpha": cfg["lora_alpha"], "targets": targets, "use_dora": cfg["use_dora"],
            "use_rslora": cfg["use_rslora"]}
    have, layers = lora_settings(model), lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError(f"load_adapter({adapter_dir}): the model's LoRA is merged; unmerge_lora(model) first")
    if have is not None and {k: have[k] for k in want} != want:
        raise ValueError(f"{file}: adapter has {format_settings(want)}; the model's LoRA has {format_settings(have)}")
    slots = layers or adaptable(model, targets)
    for name, f in factors.items():
        m = slots.get(name)
        if m is None:
            raise ValueError(f"{file}: adapts {name!r}, which the model does not have (or is not a {targets} layer)")
        if (f.A.shape[1], f.B.shape[0]) != (m.in_features, m.out_features):
            raise ValueError(f"{file}: {name} has A {tuple(f.A.shape)} and B {tuple(f.B.shape)}; the model's layer is "
                             f"{m.out_features} x {m.in_features}")
    missing = sorted(set(slots) - set(factors))
    if missing:
        raise ValueError(f"{file}: missing {len(missing)} adapted layers, e.g. {missing[0]!r}")
    saved = cfg.get("base_model_name_or_path")
    if saved and base and str(saved) != str(base):
        warnings.warn(f"{file}: adapter was trained on {saved!r}, loading it into {base!r}", stacklevel=2)
    if have is None:
        apply_lora(model, targets, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], use_dora=cfg["use_dora"],
                   use_rslora=cfg["use_rslora"], init_lora_weights=cfg["init_lora_weights"])
    with torch.no_grad():
        for name, m in lora_layers(model).items():   # to the adapter's fp32 and device
            m.lora_A.weight.copy_(factors[name].A), m.lora_B.weight.copy_(factors[name].B)
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.copy_(factors[name].magnitude)
    return model


def format_settings(s: dict) -> str:
    return (f"r={s['r']}, alpha={s['alpha']}, targets={list(s['targets'])}" + ", DoRA" * s["use_dora"] +
            ", rsLoRA" * s["use_rslora"])


def save_merged(model: CalmForCausalLM, out_dir: str | os.PathLike,
                tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Merge every adapter (the model stays merged) and write a plain GPT-NeoX checkpoint via save_checkpoint; an
    NF4 base is written dense."""
    merge_lora(model)
    with torch.device("meta"):
        plain = CalmForCausalLM(model.config)
    # A LoRA-free model sharing the merged tensors under their original names (no copy of the weights); the layers
    # still in NF4 (not adapted) are written dense, in their compute dtype.
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, NF4Weight)}
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith(LORA_KEYS) and k.rpartition(".")[0] not in quantized}
    plain.load_state_dict(state | {n: m.dequantize() for n, m in quantized.items()}, strict=True, assign=True)
    return save_checkpoint(plain, out_dir, tokenizer_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicalm.adapter",
                                description="Merge a LoRA adapter into its base model and write a plain GPT-NeoX "
                                            "checkpoint (safetensors, with the tokenizer and the run's task.json).")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    p.add_argument("--model", default=None, help="base checkpoint; default: the one the adapter records")
    p.add_argument("--revision", default=None, help="hub revision; default: the one the adapter records")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="the merged weights' dtype (W + B A is computed in fp32 and rounded once)")
    a = p.parse_args(argv)
    try:
        model_id, revision = base_for(a.adapter, a.model, a.revision)
        model = load_model(model_id, dtype=a.dtype, revision=revision)   # OpenCALM's own files are float16
        load_adapter(model, a.adapter, base=model_id)
        out = save_merged(model, a.out, tokenizer_dir=resolve(model_id, revision))
    except (ValueError, FileNotFoundError) as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    if (Path(a.adapter) / "task.json").is_file():   # the question the adapter was trained to answer
        shutil.copy(Path(a.adapter) / "task.json", out / "task.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
