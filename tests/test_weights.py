"""Checkpoint files: OpenCALM's legacy pickles (single and sharded), the hub cache path offline, clear errors on
bad input, a loader that never holds fp32 or duplicate weights, and minicalm-written checkpoints that transformers
loads (save_checkpoint, `python -m minicalm convert`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FP32_REL, ROOT, hf_tiny
from hub import write_legacy
from minicalm import CalmConfig, CalmForCausalLM, load_model, save_checkpoint
from minicalm.io.weights import LEGACY_SUFFIXES

V = 128
X = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(X)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b) -> float:
    """The largest logit difference relative to the logit scale (compare with FP32_REL, see conftest)."""
    want = logits(b).float()
    return ((logits(a).float() - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------- OpenCALM's legacy files

@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_legacy_bin_checkpoint_loads(tmp_path, shards, dtype):
    from transformers import GPTNeoXForCausalLM

    _, hf = hf_tiny(tmp_path)
    folder = write_legacy(tmp_path / "legacy", hf, shards=shards, dtype=dtype)
    assert (folder / "pytorch_model.bin.index.json").is_file() == (shards == 2)
    model = load_model(folder, dtype=torch.float32)
    oracle = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32)   # transformers on the same files
    assert max_diff(model, oracle) < FP32_REL
    if dtype == torch.float32:
        assert max_diff(model, hf) < FP32_REL   # and the model the files came from


def test_missing_rotary_pct_reads_a_quarter_like_transformers(tmp_path):
    from transformers import GPTNeoXForCausalLM

    _, hf = hf_tiny(tmp_path, rotary_pct=1.0)
    folder = write_legacy(tmp_path / "legacy", hf, drop_rotary_pct=True)
    model = load_model(folder)
    assert model.config.rotary_pct == 0.25
    oracle = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert max_diff(model, oracle) < FP32_REL
    assert max_diff(model, hf) > 1e-2   # it really is a different model from the full-rotary one


# ----------------------------------------------------------------------------- bad input: clear, specific errors

def test_missing_folder_and_missing_config(tmp_path):
    for missing in (tmp_path / "nope", "./nope", "nope"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            load_model(missing)
    folder, _ = hf_tiny(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / 'config.json'}: no such file (a checkpoint's "
                                                          f"config.json expected)")):
        load_model(folder)


def test_folder_without_weights(tmp_path):
    folder, _ = hf_tiny(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(folder)


def test_missing_shard_is_named(tmp_path):
    folder, _ = hf_tiny(tmp_path, max_shard_size="100KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        load_model(folder)


@pytest.mark.parametrize("damage", ["truncated", "truncated-by-4", "header", "header-length"])
def test_damaged_safetensors_is_named(tmp_path, damage):
    folder, _ = hf_tiny(tmp_path)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "truncated-by-4":
        data = data[:-4]
    elif damage == "header":
        data[20:30] = b"#" * 10             # inside the JSON header
    else:
        data[:8] = (10**12).to_bytes(8, "little")   # a header length past the end of the file
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable safetensors file")):
        load_model(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_bin_is_named(tmp_path, damage):
    _, hf = hf_tiny(tmp_path)
    folder = write_legacy(tmp_path / "legacy", hf)
    file = folder / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a pickle" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable PyTorch weights file")):
        load_model(folder)


# the first tensor in file order (safetensors keeps names sorted) whose shape the edited config contradicts
@pytest.mark.parametrize("field, tensor, has, implied", [
    ("vocab_size", "embed_out.weight", (128, 64), (256, 64)),
    ("hidden_size", "embed_out.weight", (128, 64), (128, 128)),
    ("intermediate_size", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", (64, 128), (64, 256)),
])
def test_shape_mismatch_names_tensor_and_config(tmp_path, field, tensor, has, implied):
    folder, _ = hf_tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert str(e.value) == (f"{folder / 'model.safetensors'}: tensor {tensor!r} has shape {has}, "
                            f"the config ({folder / 'config.json'}) implies {implied}")


def test_unknown_tensor_is_named(tmp_path):
    folder, _ = hf_tiny(tmp_path)
    file = folder / "model.safetensors"
    sd = load_file(file) | {"gpt_neox.layers.0.attention.extra.weight": torch.zeros(3)}
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"{file}: unexpected tensor 'gpt_neox.layers.0.attention.extra")):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path):
    folder, _ = hf_tiny(tmp_path)
    file = folder / "model.safetensors"
    sd = load_file(file)
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("lacks tensors ['gpt_neox.layers.1.mlp.dense_4h_to_h.bias']")):
        load_model(folder)


def test_legacy_buffer_names_are_the_ones_opencalm_carries():
    assert LEGACY_SUFFIXES == ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


# ----------------------------------------------------------------------------- memory: no fp32 or duplicate copy

MEMORY_PROBE = r"""
import json, sys, threading, time
import torch
from minicalm import load_model

sys.setswitchinterval(1e-4)   # let the sampler in between the loader's steps

def rss_anon():   # bytes of anonymous resident memory; mmapped file pages are RssFile and do not count
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

def peak_growth(fn):
    base = peak = rss_anon()
    done = False
    def sample():
        nonlocal peak
        while not done:
            peak = max(peak, rss_anon())
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    result = fn()
    time.sleep(0.005)
    done = True
    t.join()
    return max(peak, rss_anon()) - base, result

big, warm, control, quantize = sys.argv[1:]
quantize = None if quantize == "none" else quantize
load_model(warm, dtype=torch.bfloat16, quantize=quantize)   # first use of the meta device etc. imports Python
growth, model = peak_growth(lambda: load_model(big, dtype=torch.bfloat16, quantize=quantize))
dtypes = sorted({str(p.dtype) for p in model.parameters()})
# the probe's sensitivity: reading the whole fp32 state dict the plain way must show up (the model stays alive,
# so that its memory cannot be reused)
if control.endswith(".safetensors"):
    from safetensors.torch import load_file   # maps the file (RssFile): copy it as a naive loader would
    control_growth, _ = peak_growth(lambda: {k: v.clone() for k, v in load_file(control).items()})
else:
    control_growth, _ = peak_growth(lambda: torch.load(control, weights_only=True, mmap=False))
print(json.dumps({"growth": growth, "control": control_growth, "dtypes": dtypes}))
"""


@pytest.fixture(scope="module")
def mid_size(tmp_path_factory):
    """A ~112 MB fp32 checkpoint (29.4M parameters, largest tensor 4 MB) as safetensors and as a pickled .bin,
    and a tiny one of each to warm up with. Returns (folders, fp32 bytes)."""
    root = tmp_path_factory.mktemp("mem")
    folders = {}
    for name, cfg in (("big", CalmConfig(vocab_size=4096, hidden_size=512, num_hidden_layers=8,
                                         num_attention_heads=8, intermediate_size=2048)),
                      ("warm", CalmConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=128))):
        model = CalmForCausalLM(cfg).init_weights(seed=0)
        st = save_checkpoint(model, root / f"{name}-st")
        folders[f"{name}-st"] = st
        pt = root / f"{name}-bin"
        pt.mkdir()
        torch.save(model.state_dict(), pt / "pytorch_model.bin")
        (pt / "config.json").write_text((st / "config.json").read_text())
        folders[f"{name}-bin"] = pt
        if name == "big":
            nbytes = sum(p.numel() * 4 for p in model.parameters())
    return folders, nbytes


def probe_load(mid_size, kind: str, quantize: str) -> tuple[dict, int]:
    folders, fp32_bytes = mid_size
    big = folders[f"big-{kind}"]
    control = big / ("model.safetensors" if kind == "st" else "pytorch_model.bin")
    # glibc serves every block of 64 KB or more with its own mmap and unmaps it when freed: RssAnon then counts what
    # the loader holds, not heap holes between freed temporaries and kept tensors, which glibc keeps resident
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(big), str(folders[f"warm-{kind}"]), str(control),
                          quantize], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["control"] > 0.9 * fp32_bytes, "the probe does not see a plain fp32 load; the checks prove nothing"
    return r, fp32_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_bf16_load_never_holds_fp32_or_duplicate_weights(mid_size, kind):
    r, fp32_bytes = probe_load(mid_size, kind, "none")
    assert r["dtypes"] == ["torch.bfloat16"]
    # the bf16 model itself is 0.5x; an fp32 copy of the weights (or a second bf16 copy) would pass 0.75x
    assert r["growth"] < 0.75 * fp32_bytes, f"loading grew RssAnon by {r['growth'] / fp32_bytes:.2f}x the fp32 size"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_nf4_load_never_holds_the_model_in_bf16(mid_size, kind):
    """quantize="nf4" quantizes each block weight as it is read: the NF4 model is ~0.18x the fp32 size (4.1 bits for
    86% of the weights, bf16 for the embedding and the head), one tensor's temporaries come and go (measured: 0.22x);
    the whole model in bf16 at once would be 0.5x."""
    r, fp32_bytes = probe_load(mid_size, kind, "nf4")
    assert r["growth"] < 0.3 * fp32_bytes, f"loading grew RssAnon by {r['growth'] / fp32_bytes:.2f}x the fp32 size"


# ----------------------------------------------------------------------------- files minicalm writes

@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 100_000], ids=["single", "sharded"])
def test_save_checkpoint_loads_in_transformers(tmp_path, max_shard_bytes):
    from transformers import GPTNeoXForCausalLM

    folder, hf = hf_tiny(tmp_path, rotary_pct=0.25, use_parallel_residual=True)
    model = load_model(folder)
    out = save_checkpoint(model, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_bytes == 100_000:
        assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]
    assert not list(out.glob(".*.tmp*"))   # no temporary files left behind
    back = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.rope_parameters["partial_rotary_factor"] == 0.25 and back.config.use_parallel_residual
    assert max_diff(back, model) < FP32_REL and max_diff(back, hf) < FP32_REL
    assert max_diff(load_model(out), model) == 0


def test_convert_bin_to_safetensors_cli(tmp_path):
    """OpenCALM's main as fp16 pickles -> `python -m minicalm convert SRC OUT` (default: the checkpoint's own dtype,
    fp16) -> identical logits."""
    _, hf = hf_tiny(tmp_path)
    src = write_legacy(tmp_path / "legacy", hf, shards=2, dtype=torch.float16)
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "converted"
    # glibc serves every block of 64 KB or more with its own mmap and unmaps it when freed: RssAnon then counts what
    # the loader holds, not heap holes between freed temporaries and kept tensors, which glibc keeps resident
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run([sys.executable, "-m", "minicalm", "convert", str(src), str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    sd = load_file(out / "model.safetensors")
    assert not [k for k in sd if k.endswith(LEGACY_SUFFIXES)]
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert torch.equal(logits(load_model(out, dtype=torch.float32)), logits(load_model(src, dtype=torch.float32)))
