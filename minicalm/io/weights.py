"""Checkpoint files: find them (local folder or hub id), read them shard by shard, save them.

Loading builds the model on the meta device and fills it tensor by tensor, each converted straight to the
requested dtype and device, so a 7B bf16 load never holds an fp32 copy or the whole checkpoint twice.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import CalmConfig, resolve_dtype
from ..model import BLOCK_LINEAR, CalmForCausalLM
from ..nf4 import NF4Linear, NF4Weight
from . import hub
from .files import atomic_folder, atomic_write, read_json, write_json

# Per-layer buffers that old GPT-NeoX checkpoints (OpenCALM's among them) carry and this model recomputes.
LEGACY_SUFFIXES = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
HEAD_ALIASES = {"lm_head.weight": "embed_out.weight"}   # transformers 5.x's in-memory name for the head
CONFIG_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
WEIGHT_PATTERNS = (["*.safetensors", "model.safetensors.index.json"],
                   ["pytorch_model*.bin", "pytorch_model.bin.index.json"])


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, weights: bool = True) -> Path:
    """A local folder as is, or a hub id's config, tokenizer and weights downloaded into the hub cache.

    Safetensors are preferred; the pickled .bin files that OpenCALM's `main` branches hold are the fallback."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    s = str(name_or_path)
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"{s}: no such checkpoint folder (nor a hub id of the form owner/name)")
    rev = f" --revision {revision}" if revision else ""
    local = (f"hf download {s}{rev} --local-dir {s.split('/')[-1]} where the hub is reachable, then pass that folder "
             f"instead")
    for patterns in WEIGHT_PATTERNS if weights else ([],):
        folder = hub.snapshot(s, revision, CONFIG_FILES + patterns, offline_hint=local)
        if not weights or weight_files(folder, missing_ok=True):
            break
    else:
        raise FileNotFoundError(f"{s} (revision {revision or 'main'}) has no *.safetensors or pytorch_model*.bin "
                                f"weights on the hub")
    if weights and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{s} (revision {revision or 'main'}) has no config.json on the hub")
    return folder


def model_config(name_or_path: str | os.PathLike, revision: str | None = None) -> CalmConfig:
    """A checkpoint's CalmConfig from its config.json alone (no weights downloaded): what is checked before a model
    loads (the positions an example or a prompt must fit)."""
    return CalmConfig.from_json(resolve(name_or_path, revision, weights=False) / "config.json")


def weight_files(folder: Path, missing_ok: bool = False) -> list[Path]:
    """The weight shards of a folder, safetensors first: an index's shards, or the single file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "a weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index}: not a weight index (no weight_map)")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index} names shards that are not there: {missing}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    if missing_ok:
        return []
    raise FileNotFoundError(f"{folder}: no weights (model.safetensors, its sharded index, pytorch_model.bin "
                            f"or its sharded index)")


def read_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one shard, one at a time. .bin files are unpickled with weights_only=True."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    else:
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:   # pre-zip pickles cannot be memory-mapped
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:     # truncated or not a checkpoint: name the file
            first_line = str(e).partition("\n")[0]   # torch's messages run to paragraphs
            raise ValueError(f"{file}: not a readable PyTorch weights file ({first_line})") from None
        yield from sd.items()
        del sd


def fingerprint(folder: str | os.PathLike, sample: int = 2**20) -> str:
    """What a checkpoint is, wherever it lies: a hash of its config.json and, for each weight file, its name, size and
    four samples of `sample` bytes (its start, which holds the tensor index, its thirds and its end). A few MiB read,
    not the 14 GB of OpenCALM-7B, tell a moved or copied checkpoint (the same) from another one (other values in the
    samples, another size or index). A resumed run compares its base by this, not by its path."""
    folder, h = Path(folder), hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for file in weight_files(folder):
        size = file.stat().st_size
        h.update(f"{file.name}:{size};".encode())
        with open(file, "rb") as f:
            for at in sorted({0, size // 3, 2 * size // 3, max(size - sample, 0)}):
                f.seek(at)
                h.update(f.read(sample))
    return h.hexdigest()


def check_finite(file: Path, name: str, t: torch.Tensor) -> None:
    """A NaN or inf in a stored weight would only show up later as a NaN loss or garbage text: name it at loading."""
    # a NaN or inf makes the sum one; a sum allocates nothing, where isfinite holds temporaries of the tensor's size
    if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
        n = t.numel() - int(torch.isfinite(t).sum())   # 0 if only the sum overflowed
        if n:
            raise ValueError(f"{file}: tensor {name!r} holds {n} non-finite values (nan/inf); the checkpoint is damaged "
                             f"or was saved from a diverged run: download or copy it again, or use an earlier one")


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json says its weights are stored in (torch_dtype, or transformers 5.x's
    dtype), if it says one."""
    d = read_json(folder / "config.json", "a checkpoint's config.json")
    name = d.get("torch_dtype") or d.get("dtype")
    return getattr(torch, name) if name in ("float16", "bfloat16", "float32") else None


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device="cpu",
               revision: str | None = None, quantize: str | None = None) -> CalmForCausalLM:
    """Load a GPT-NeoX checkpoint (local folder or hub id) into minicalm's model, in eval mode. (An adapter trained on
    it records it when save_adapter is told: save_adapter(model, dir, base=name_or_path, revision=revision).)

    dtype None or "auto" means bf16 on a GPU that supports it, else fp32 (config.resolve_dtype). quantize="nf4" stores
    the blocks' linear weights as NF4 (nf4.py), each quantized as it is read: the model is never whole in 16 bits.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize {quantize!r}: the one 4-bit format here is 'nf4'")
    folder = resolve(name_or_path, revision)
    cfg = CalmConfig.from_json(folder / "config.json")
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = CalmForCausalLM(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("embed_out.weight")
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        for name, t in read_tensors(file):
            if name.endswith(LEGACY_SUFFIXES):
                continue
            name = HEAD_ALIASES.get(name, name)
            if name == "embed_out.weight" and cfg.tie_word_embeddings:
                continue
            if name not in expected:
                raise ValueError(f"{file}: unexpected tensor {name!r} for a GPT-NeoX model")
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, the config "
                                 f"({folder / 'config.json'}) implies {tuple(expected[name].shape)}")
            check_finite(file, name, t)   # as stored; not the legacy buffers skipped above (-1e9 is -inf in fp16)
            t = t.to(device=device, dtype=dtype)   # one tensor at a time, never an fp32 model copy
            state[name] = NF4Weight(t) if quantize and BLOCK_LINEAR.fullmatch(name.removesuffix(".weight")) else t
            del t
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{folder}: checkpoint lacks tensors {missing[:5]}{more}")
    for name in [n for n, w in state.items() if isinstance(w, NF4Weight)]:   # those layers become NF4Linear
        layer = name.removesuffix(".weight")
        model.set_submodule(layer, NF4Linear(state.pop(name), state.pop(layer + ".bias", None)))
    model.load_state_dict(state, strict=False, assign=True)   # every name and shape was checked above, by file
    if cfg.tie_word_embeddings:
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    return model.eval()


def save_checkpoint(model: CalmForCausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + (sharded) model.safetensors that minicalm and transformers both load.

    Files are written to temporary names and renamed, so a crash never leaves a half-written checkpoint.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("embed_out.weight")
    shards, size = [{}], 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k], size = v, size + nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        atomic_write(out / name, lambda p, shard=shard: save_file(shard, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        write_json(out / "model.safetensors.index.json", index)
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    write_json(out / "config.json", model.config.to_dict() | {"torch_dtype": dtype})
    if tokenizer_dir is not None:
        for f in CONFIG_FILES[1:]:
            src = Path(tokenizer_dir) / f
            if src.is_file():
                atomic_write(out / f, lambda p, src=src: p.write_bytes(src.read_bytes()))
    return out


def convert_bin_to_safetensors(src: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | torch.dtype = "auto",
                               revision: str | None = None, replace: bool = False) -> Path:
    """Rewrite a pickled .bin checkpoint (e.g. OpenCALM's main) as sharded safetensors, legacy buffers dropped; in its
    own dtype unless told (config.resolve_dtype's "auto"). The folder is written whole or not at all (a full disk
    leaves no checkpoint without its tokenizer); an existing one with files is replaced only with `replace`."""
    folder = resolve(src, revision)
    model = load_model(folder, dtype=resolve_dtype(dtype, "cpu", stored=stored_dtype(folder)))
    with atomic_folder(out_dir, replace=replace) as tmp:
        save_checkpoint(model, tmp, tokenizer_dir=folder)
    return Path(out_dir)
