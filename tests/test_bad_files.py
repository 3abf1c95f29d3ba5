"""Files that are wrong in ways a user does not see: not UTF-8, a JSON array for JSON lines, a full disk mid-save, the
temporary files of a killed run, NaN or inf in a checkpoint. Each is one error that names the file (and the line or
tensor) and says what to do."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicalm import CalmForCausalLM, load_model, save_checkpoint
from minicalm.config import PRESETS
from minicalm.io import files
from minicalm.io.adapter import load_adapter, save_adapter
from minicalm.io.files import atomic_write, read_json, read_records, remove_stale_temps
from minicalm.lora import LoRALinear, apply_lora
from minicalm.tasks.data import read_jsonl
from minicalm.tasks.task import load_task

GOOD = '{"sentence": "良い", "label": "positive", "review_id": "a"}\n'


# ----------------------------------------------------------------------------- text that is not UTF-8

def test_non_utf8_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD * 2).encode() + '{"sentence": "良い'.encode() + b'\xff"}\n')
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    # the column counts characters, as an editor does ("良い" is 6 bytes, 2 columns); the BOM is no column
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xff at column 17); save the file as UTF-8"


def test_shift_jis_json_and_records_name_file_and_line(tmp_path):
    task = tmp_path / "task.json"
    task.write_bytes('{\n  "name": "t",\n  "prompt": "感想: {text}"\n}\n'.encode("cp932"))
    with pytest.raises(ValueError, match=re.escape(f"{task}:3: not UTF-8 text (byte 0x8a at column 14)")):
        load_task(task)   # task files are read by read_json
    with pytest.raises(ValueError, match=re.escape(f"{task}:3: not UTF-8 text")):
        read_json(task)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n' + '{"note": "良い"}\n'.encode("cp932"))
    with pytest.raises(ValueError, match=re.escape(f"{metrics}:2: not UTF-8 text (byte 0x97 at column 11)")):
        read_records(metrics)


# ----------------------------------------------------------------------------- a JSON array where JSON lines go

@pytest.mark.parametrize("name, text", [
    ("data.json", "[\n  " + GOOD.strip() + ",\n  " + GOOD.strip().replace('"a"', '"b"') + "\n]\n"),
    ("data.jsonl", "\ufeff\n  [" + GOOD.strip() + ", " + GOOD.strip().replace('"a"', '"b"') + "]"),
])
def test_a_json_array_of_rows_is_read_too(tmp_path, name, text):
    """Stanford Alpaca ships its rows as one JSON array: read as it is, whatever the file is called."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert [r.id for r in read_jsonl(path)] == ["a", "b"] and [r.id for r in read_jsonl(path, limit=1)] == ["a"]
    path.write_text(text.replace('"label": "positive"', '"label": "neutral"', 1), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}[0]: unknown label 'neutral'")):
        read_jsonl(path)
    path.write_text("[" + GOOD.strip() + ",", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON (") + ".*read as one JSON array"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- a full disk during an atomic save

def test_full_disk_raises_enospc_and_keeps_the_previous_file(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this platform")
    target = atomic_write(tmp_path / "model.safetensors", lambda p: p.write_bytes(b"previous"))

    def write(p):   # part of the file fits, then the disk is full (a real ENOSPC from the kernel)
        p.write_bytes(b"partial")
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 4096)

    with pytest.raises(OSError) as e:
        atomic_write(target, write)
    assert e.value.errno == errno.ENOSPC
    assert re.fullmatch(rf"no space left on device in {re.escape(str(tmp_path))}: writing model\.safetensors failed "
                        r"\(\d+ MiB free\); the previous model\.safetensors is intact", e.value.strerror)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model.safetensors"]


def test_torch_save_failing_on_a_nearly_full_disk_says_so(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    target.write_bytes(b"previous")

    def torch_like(p):   # what torch.save raises when its stream cannot write
        p.write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: SimpleNamespace(total=2**30, used=2**30, free=0))
    with pytest.raises(OSError, match=re.escape(f"no space left on device in {tmp_path}: writing state.pt failed "
                                                f"(0 MiB free); the previous state.pt is intact")):
        atomic_write(target, torch_like)
    with pytest.raises(OSError, match="no state2.pt was written"):
        atomic_write(tmp_path / "state2.pt", torch_like)
    assert target.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["state.pt"]
    # with room on the disk the same error is not a full disk: it passes through unchanged
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: SimpleNamespace(total=2**40, used=0, free=2**40))
    with pytest.raises(RuntimeError, match="^basic_ios::clear: iostream error$"):
        atomic_write(target, torch_like)
    assert target.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["state.pt"]


# ----------------------------------------------------------------------------- temporary files of a killed run

def test_remove_stale_temps_removes_those_of_dead_processes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()   # its pid is now free (a reuse within the test would only keep the file)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "deeper").mkdir()
    dead = [tmp_path / f".state.pt.tmp{child.pid}", tmp_path / "adapter" / f".adapter_model.safetensors.tmp{child.pid}"]
    kept = [tmp_path / f".metrics.png.tmp{os.getpid()}",                    # being written by a live process
            tmp_path / ".notes.tmp", tmp_path / "state.pt", tmp_path / "x.tmp1",   # not atomic_write's names
            tmp_path / "adapter" / "deeper" / f".a.tmp{child.pid}"]                # below the immediate subfolders
    for f in dead + kept:
        f.write_bytes(b"x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(dead)
    assert not any(f.exists() for f in dead) and all(f.exists() for f in kept)
    assert remove_stale_temps(tmp_path) == []


# ----------------------------------------------------------------------------- NaN and inf in checkpoints

@pytest.fixture
def tiny(tmp_path):
    model = CalmForCausalLM(PRESETS["tiny"]).init_weights(seed=0)
    return save_checkpoint(model, tmp_path / "ckpt"), model


def test_non_finite_checkpoint_weight_is_named(tmp_path, tiny):
    folder, _ = tiny
    file = folder / "model.safetensors"
    sd = load_file(file)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    sd[name][0, :2], sd[name][3, 5] = float("nan"), float("-inf")
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert str(e.value).startswith(f"{file}: tensor {name!r} holds 3 non-finite values (nan/inf); the checkpoint is "
                                   f"damaged")


def test_a_sum_that_overflows_is_not_a_non_finite_weight(tiny):
    """check_finite sums first (no temporaries): an inf sum of finite weights must not stop a load."""
    folder, _ = tiny
    file = folder / "model.safetensors"
    sd = load_file(file)
    sd["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"][0, :2] = 3e38
    save_file(sd, file, metadata={"format": "pt"})
    assert load_model(folder).gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] == 3e38


def test_legacy_fp16_masked_bias_of_minus_inf_still_loads(tmp_path, tiny):
    """-1e9 (GPT-NeoX's old masked_bias) is -inf in fp16; the buffer is not used, so it must not stop a load."""
    folder, model = tiny
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9).half()
    torch.save(sd, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    assert torch.isinf(sd["gpt_neox.layers.0.attention.masked_bias"])
    load_model(legacy, dtype=torch.float32)


def test_non_finite_adapter_weight_is_named_and_changes_nothing(tmp_path, tiny):
    folder, _ = tiny
    adapter = save_adapter(apply_lora(load_model(folder), r=4, alpha=16), tmp_path / "adapter", str(folder))
    file = adapter / "adapter_model.safetensors"
    sd = load_file(file)
    key = "base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight"
    sd[key][1, 1] = float("nan")
    save_file(sd, file, metadata={"format": "pt"})
    model = load_model(folder)
    with pytest.raises(ValueError, match=re.escape(f"{file}: tensor {key!r} holds 1 non-finite values (nan/inf)")):
        load_adapter(model, adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
