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
- DoRA (W' = m (W + ΔW) / ||W + ΔW||_row): ΔW above is its direction's update, and magnitude_change =
  ||m - m0|| / ||m0||, m0 = W's row norms (where m started), says how far the rows' lengths moved.

`python -m minicalm stats ADAPTER --out DIR [--base MODEL|none] [--compare ADAPTER2]` writes
DIR/adapter_stats.json and its pictures (drawn by minicalm.plot).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import BLOCK_LINEARS
from ..io.adapter import adapter_base, read_adapter
from ..io.files import check_writable, write_json
from ..io.weights import read_tensors, resolve, weight_files
from ..model import BLOCK_LINEAR
from .plot import draw_if_possible, plot_adapter_stats


def layer_and_target(name: str) -> tuple[int, str]:
    """gpt_neox.layers.3.mlp.dense_h_to_4h -> (3, "dense_h_to_4h")."""
    match = BLOCK_LINEAR.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a GPT-NeoX block's linear layer (gpt_neox.layers.N.attention|mlp.NAME)")
    return int(match[1]), match[2]


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


def base_weights(base: str | os.PathLike, names: list[str], revision: str | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, W) for the named modules, streamed from the base checkpoint's files one tensor at a time.

    Reading the files instead of load_model keeps one weight matrix in memory, not a whole 7B model; the price is
    one pass over the checkpoint (.bin files are memory-mapped, so only the adapted weights are read from them)."""
    wanted = {n + ".weight": n for n in names}   # the model mirrors the checkpoint's names: no renaming
    for file in weight_files(resolve(base, revision)):
        for key, t in read_tensors(file):
            if wanted.pop(key, None) is not None:
                yield key.removesuffix(".weight"), t
    if wanted:
        raise ValueError(f"{base}: has no {next(iter(wanted))!r}; is it the base model the adapter was trained on?")


def compare_adapters(adapter_dir: str | os.PathLike, other_dir: str | os.PathLike) -> dict:
    """phi for every module both adapters adapt, and its mean over those modules."""
    mine, theirs = read_adapter(adapter_dir).factors, read_adapter(other_dir).factors
    common = [n for n in mine if n in theirs]
    if not common:
        raise ValueError(f"{adapter_dir} and {other_dir} adapt no module in common")
    for n in common:   # A is (r, in): the same input size, or the two were trained on different base models
        if mine[n].A.shape[1] != theirs[n].A.shape[1]:
            raise ValueError(f"{adapter_dir} and {other_dir} adapt {n} with inputs of {mine[n].A.shape[1]} and "
                             f"{theirs[n].A.shape[1]} features: adapters of different base models cannot be compared")
    phis = {n: subspace_similarity(mine[n][0], theirs[n][0]) for n in common}
    only = {"only_in_adapter": [n for n in mine if n not in theirs], "only_in_compare": [n for n in theirs if n not in mine]}
    return {"adapter": str(other_dir), "modules": {n: phi.tolist() for n, phi in phis.items()},
            "mean": torch.stack(list(phis.values())).mean(0).tolist()} | only


def inspect_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                    compare: str | os.PathLike | None = None, revision: str | None = None) -> dict:
    """The contents of adapter_stats.json. base: a checkpoint folder or hub id (at `revision`), for weight_norm,
    relative_update and amplification (None: the adapter alone). compare: a second adapter folder, for phi."""
    adapter = read_adapter(adapter_dir)
    cfg, adapters = adapter.config, adapter.factors
    compared = None if compare is None else compare_adapters(adapter_dir, compare)   # cheap: before the base
    modules, svds = {}, {}
    for name in sorted(adapters, key=lambda n: (layer_and_target(n)[0], BLOCK_LINEARS.index(layer_and_target(n)[1]))):
        A, B, _ = adapters[name]
        U, S, V = svds[name] = delta_svd(A, B, cfg.scaling)
        layer, target = layer_and_target(name)
        modules[name] = {"name": name, "layer": layer, "target": target, "delta_norm": S.norm().item(),
                         "singular_values": S.tolist()}
    if base is not None:
        for name, W in base_weights(base, list(modules), revision):
            U, S, V = svds[name]
            if W.shape != (len(U), len(V)):
                raise ValueError(f"{base}: {name} is {tuple(W.shape)}, the adapter's update is {(len(U), len(V))}")
            weight_norm = torch.linalg.matrix_norm(W.double())
            modules[name] |= {"weight_norm": weight_norm.item(), "relative_update": (S.norm() / weight_norm).item(),
                              "amplification": amplification(W, U, S, V)}
            if adapters[name].magnitude is not None:   # DoRA: m started at W's row norms
                m0 = W.double().norm(dim=1)
                modules[name]["magnitude_change"] = ((adapters[name].magnitude.double() - m0).norm() / m0.norm()).item()
    return {"adapter": str(adapter_dir), "base": None if base is None else str(base), "revision": revision,
            "r": cfg.r, "alpha": cfg.alpha, "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora,
            "modules": list(modules.values()), "compare": compared}


@dataclass
class StatsConfig:
    adapter: str                             # adapter folder (adapter_config.json + adapter_model.safetensors)
    out: str = "runs/adapter-stats"          # output folder: adapter_stats.json and its pictures
    base: str | None = None                  # base checkpoint folder or hub id (default: the one the adapter records,
                                             # at its revision; none: the adapter alone)
    revision: str | None = None              # the base's hub revision (default: the adapter's, for its base)
    compare: str | None = None               # a second adapter folder: subspace similarity phi


def stats(a: StatsConfig) -> None:
    """python -m minicalm stats ADAPTER: adapter_stats.json and its pictures in --out."""
    out = check_writable(a.out, "--out")
    base, revision = a.base, a.revision
    if base is None:   # the checkpoint the adapter records, at its revision
        base, saved = adapter_base(a.adapter)
        revision = revision or saved
    try:
        result = inspect_adapter(a.adapter, None if base in (None, "none") else base, a.compare, revision)
    except (OSError, ValueError) as e:   # missing files, an unreachable hub id, a base that does not match
        hint = " (--base PATH picks the base model, --base none skips it)" if base not in (None, "none") else ""
        raise type(e)(f"{e}{hint}") from None
    out.mkdir(parents=True, exist_ok=True)
    compared = result["compare"]
    if compared and (compared["only_in_adapter"] or compared["only_in_compare"]):   # e.g. two depths, other targets
        print(f"compared the {len(compared['modules'])} modules both adapters adapt; not compared: "
              f"{len(compared['only_in_adapter'])} only in {a.adapter}, {len(compared['only_in_compare'])} only in "
              f"{a.compare}", file=sys.stderr)
    written = [write_json(out / "adapter_stats.json", result, indent=1)]
    written += draw_if_possible(plot_adapter_stats, result, out, prog="python -m minicalm stats")
    print(f"wrote {', '.join(str(w) for w in written)}")
