"""What a trained LoRA adapter changed, read from its files (and the base model's weights, when given).

Each adapted layer's update is ΔW = (alpha/r) B A, an (out x in) matrix of rank at most r:

- delta_norm = ||ΔW||_F, how big the update is; singular_values, how that size spreads over its r directions
  (a steep fall after the first few: the adapter uses only a few directions, and a smaller r would do).
- relative_update = ||ΔW||_F / ||W||_F, the update against the frozen weight it is added to (for a pretrained
  model typically well below 1: LoRA nudges the layer, it does not rewrite it).
- amplification = ||ΔW||_F / ||U^T W V||_F, U and V the top-r singular vectors of ΔW (LoRA paper, Hu et al.
  2021, section 7.3): ΔW's size against W's own size along ΔW's directions. Well above 1 (the paper reports about
  20 for r = 4 on GPT-3's W_q): ΔW amplifies directions W barely uses; near or below 1: it repeats W's strong ones.
- phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), U1_i and U2_j the top-i and top-j right-singular vectors of two
  adapters' A (section 7.2): 1 when the smaller subspace lies inside the other, 0 when they are orthogonal.
  Two runs (other seeds or ranks) that agree on their top directions found what the task needs, not noise.

`python -m minicalm.inspect ADAPTER --out DIR [--base MODEL|none] [--compare ADAPTER2]` writes DIR/inspect.json
and its pictures (drawn by minicalm.plot).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import torch

from .lora import LORA_KEYS, PEFT_PREFIX, UNSUPPORTED, VALID_TARGETS
from .plot import plot_inspection
from .weights import atomic_write, read_tensors, resolve, weight_files

MODULE = re.compile(r"gpt_neox\.layers\.(\d+)\.(?:attention|mlp)\.(\w+)")   # an adapted layer's name


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter_config.json and {module name: (A (r, in), B (out, r))} in fp64, in layer then target order.
    Names lose PEFT's `base_model.model.` prefix: gpt_neox.layers.0.attention.query_key_value."""
    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    bad = {k: cfg[k] for k in UNSUPPORTED if cfg.get(k) not in (None, False, "none", {}, [])}
    if cfg.get("peft_type") != "LORA" or bad:   # these settings change ΔW's formula
        raise ValueError(f"{folder}: not a plain LoRA adapter (peft_type {cfg.get('peft_type')!r}, settings {bad})")
    parts: dict[str, list] = {}
    for key, t in read_tensors(folder / "adapter_model.safetensors"):
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_KEYS if name.endswith(s)), None)
        if suffix is None or not MODULE.fullmatch(name.removesuffix(suffix)):
            raise ValueError(f"{folder}: unexpected tensor {key!r} for a GPT-NeoX LoRA adapter")
        parts.setdefault(name.removesuffix(suffix), [None, None])[LORA_KEYS.index(suffix)] = t.double()
    broken = [n for n, ab in parts.items() if None in ab]
    if broken or not parts:
        raise ValueError(f"{folder}: needs lora_A and lora_B for every module; incomplete: {broken or 'all'}")
    order = sorted(parts, key=lambda n: (layer_and_target(n)[0], VALID_TARGETS.index(layer_and_target(n)[1])))
    return cfg, {n: tuple(parts[n]) for n in order}


def layer_and_target(name: str) -> tuple[int, str]:
    """gpt_neox.layers.3.mlp.dense_h_to_4h -> (3, "dense_h_to_4h")."""
    layer, target = MODULE.fullmatch(name).groups()
    return int(layer), target


def delta_svd(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, r), S (r,), V (in, r) in fp64 with scaling * B A = U diag(S) V^T, S largest first.

    The (out, in) product is never formed (OpenCALM-7B's query_key_value is 12288 x 4096): with thin QRs
    B = Qb Rb and A^T = Qa Ra, whose Q's have orthonormal columns, scaling B A = Qb (scaling Rb Ra^T) Qa^T.
    So the SVD of that r x r core, Uc diag(S) Vc^T, is ΔW's own: the same S, U = Qb Uc, V = Qa Vc.
    """
    Qb, Rb = torch.linalg.qr(B.double())                  # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.double().T)                # (in, r), (r, r)
    Uc, S, Vch = torch.linalg.svd(scaling * Rb @ Ra.T)    # the (r, r) core
    return Qb @ Uc, S, Qa @ Vch.T


def amplification(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    """||ΔW||_F / ||U^T W V||_F for ΔW = U diag(S) V^T (delta_svd's output; for a dense ΔW take torch.linalg.svd's
    first r columns of U and rows of Vh, transposed). U^T W V (r, r) is W seen in ΔW's input and output directions.
    The paper writes V^T because its V holds the vectors as rows."""
    return (S.norm() / (U.T @ W.double() @ V).norm()).item()


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """phi (r1, r2) in fp64: phi[i-1, j-1] = ||U1_i^T U2_j||_F^2 / min(i, j), U1_i the top-i right-singular
    vectors of A1 (r1, in) and U2_j the top-j of A2 (r2, in). Every entry lies in [0, 1]."""
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh   # (r1, in): directions as rows, largest first
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh   # (r2, in)
    overlap = (V1 @ V2.T) ** 2                                     # (r1, r2): squared cosines between directions
    i = torch.arange(1, len(V1) + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, len(V2) + 1, dtype=torch.float64)[None, :]
    return overlap.cumsum(0).cumsum(1) / torch.minimum(i, j)       # sum over the top i x top j block


def base_weights(base: str | os.PathLike, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, W) for the named modules, streamed from the base checkpoint's files one tensor at a time.

    Reading the files instead of load_model keeps one weight matrix in memory, not a whole 7B model; the price is
    one pass over the checkpoint (.bin files are memory-mapped, so only the adapted weights are read from them)."""
    wanted = {n + ".weight": n for n in names}   # the model mirrors the checkpoint's names: no renaming
    for file in weight_files(resolve(base)):
        for key, t in read_tensors(file):
            if wanted.pop(key, None) is not None:
                yield key.removesuffix(".weight"), t
    if wanted:
        raise ValueError(f"{base}: has no {next(iter(wanted))!r}; is it the base model the adapter was trained on?")


def compare_adapters(adapter_dir: str | os.PathLike, other_dir: str | os.PathLike) -> dict:
    """phi for every module both adapters adapt, and its mean over those modules."""
    _, mine = read_adapter(adapter_dir)
    _, theirs = read_adapter(other_dir)
    common = [n for n in mine if n in theirs]
    if not common:
        raise ValueError(f"{adapter_dir} and {other_dir} adapt no module in common")
    phis = {n: subspace_similarity(mine[n][0], theirs[n][0]) for n in common}
    return {"adapter": str(other_dir), "modules": {n: phi.tolist() for n, phi in phis.items()},
            "mean": torch.stack(list(phis.values())).mean(0).tolist()}


def inspect_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                    compare: str | os.PathLike | None = None) -> dict:
    """The contents of inspect.json. base: a checkpoint folder or hub id, for weight_norm, relative_update and
    amplification (None: the adapter alone). compare: a second adapter folder, for phi."""
    cfg, adapters = read_adapter(adapter_dir)
    compared = None if compare is None else compare_adapters(adapter_dir, compare)   # cheap: before the base
    scaling = cfg.get("lora_alpha", 8) / cfg["r"]   # peft's default alpha
    modules, svds = {}, {}
    for name, (A, B) in adapters.items():
        U, S, V = svds[name] = delta_svd(A, B, scaling)
        layer, target = layer_and_target(name)
        modules[name] = {"name": name, "layer": layer, "target": target, "delta_norm": S.norm().item(),
                         "singular_values": S.tolist()}
    if base is not None:
        for name, W in base_weights(base, list(modules)):
            U, S, V = svds[name]
            if W.shape != (len(U), len(V)):
                raise ValueError(f"{base}: {name} is {tuple(W.shape)}, the adapter's update is {(len(U), len(V))}")
            weight_norm = torch.linalg.matrix_norm(W.double())
            modules[name] |= {"weight_norm": weight_norm.item(), "relative_update": (S.norm() / weight_norm).item(),
                              "amplification": amplification(W, U, S, V)}
    return {"adapter": str(adapter_dir), "base": None if base is None else str(base), "r": cfg["r"],
            "lora_alpha": cfg.get("lora_alpha", 8), "modules": list(modules.values()),
            "compare": compared}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicalm.inspect",
                                description="What a LoRA adapter changed: update norms, spectra, amplification, and "
                                            "subspace similarity with another adapter (inspect.json + PNGs).")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="base checkpoint folder or hub id (default: the adapter config's "
                                                "base_model_name_or_path; 'none': the adapter alone)")
    p.add_argument("--compare", default=None, help="a second adapter folder: subspace similarity phi")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(argv)
    out, base = Path(a.out), None
    try:
        base = a.base or read_adapter(a.adapter)[0].get("base_model_name_or_path") or "none"
        result = inspect_adapter(a.adapter, None if base == "none" else base, a.compare)
    except (OSError, ValueError) as e:   # missing files, an unreachable hub id, a base that does not match
        hint = " (--base PATH picks the base model, --base none skips it)" if base not in (None, "none") else ""
        sys.exit(f"python -m minicalm.inspect: {e}{hint}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "inspect.json", lambda f: f.write_text(json.dumps(result, indent=1), encoding="utf-8"))
    try:
        pictures = plot_inspection(result, out)
    except ModuleNotFoundError as e:   # the numbers are written; only the pictures need matplotlib
        if e.name != "matplotlib":
            raise
        sys.exit(f"python -m minicalm.inspect: wrote {out / 'inspect.json'}, but {e}")
    print(f"wrote {out / 'inspect.json'} and {', '.join(p.name for p in pictures)}", file=sys.stderr)


if __name__ == "__main__":
    main()
