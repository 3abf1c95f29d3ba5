"""The small commands of `python -m minicalm` (tools/commands.py, stats, plot) where a mistake would lose or hide
something: merge and convert never overwrite their own base or an existing checkpoint (unless --force) and write a
folder whole or not at all; generate says what it cut, what it assumed and what it cannot do; stats and plot say what
they left out. Each refusal is one line, exit status 1, nothing written; the commands run as users run them, in
subprocesses."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_adapter
from minicalm.config import LoraConfig
from minicalm.io import weights
from minicalm.tools import commands

ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tree(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def minicalm(*args: str, cwd=ROOT, shell_suffix: str = "") -> subprocess.CompletedProcess:
    """`python -m minicalm ARGS` as a user runs it (through bash when shell_suffix redirects something)."""
    cmd = [sys.executable, "-m", "minicalm", *map(str, args)]
    if shell_suffix:
        cmd = ["bash", "-c", " ".join(f"'{c}'" for c in cmd) + " " + shell_suffix]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, command: str, says: str) -> None:
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.startswith(f"python -m minicalm {command}: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_adapter(base[0], tmp_path_factory.mktemp("adapter") / "adapter", LoraConfig(), seed=0)


# ----------------------------------------------------------------------------- merge, convert

def test_merge_refuses_to_overwrite_its_own_base_or_adapter(base, adapter, tmp_path):
    folder = base[0]
    before = tree(folder)
    (tmp_path / "link").symlink_to(folder)   # the base under another name
    for out in (folder, tmp_path / "link", folder.parent):   # the base itself, a symlink to it, a folder holding it
        done = minicalm("merge", adapter, "--out", out, "--force")   # --force never replaces the base
        one_line_error(done, "merge", f"--out {out} is the folder of the adapter's base ({folder.resolve()}) or "
                                      f"holds it: writing there would overwrite it; choose another --out")
    one_line_error(minicalm("merge", adapter, "--out", adapter), "merge", "is the folder of the adapter (")
    assert tree(folder) == before


def test_merge_into_an_existing_checkpoint_needs_force_and_a_folder_of_other_files_is_refused(base, adapter,
                                                                                               tmp_path):
    out = tmp_path / "merged"
    assert minicalm("merge", adapter, "--out", out).returncode == 0
    first = tree(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    one_line_error(minicalm("merge", adapter, "--out", out), "merge",
                   f"--out {out} already holds a checkpoint: pass --force to replace it, or choose another --out")
    assert tree(out) == first
    other = make_adapter(base[0], tmp_path / "other", LoraConfig(), seed=1)
    done = minicalm("merge", other, "--out", out, "--force")
    assert done.returncode == 0, done.stderr
    assert set(tree(out)) == set(first) and tree(out) != first   # replaced whole: the other adapter's weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]   # no temporary folder left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    one_line_error(minicalm("merge", adapter, "--out", tmp_path / "notes", "--force"), "merge",
                   "holds other files (todo.txt...): choose a new or empty folder")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_merge_and_convert_on_a_full_disk_leave_no_half_checkpoint(base, adapter, tmp_path, monkeypatch):
    """The disk fills after config.json and part of the weights: the folder is written in a temporary place and
    renamed only when whole, so nothing is left, and the advice is what the command can do (no --resume)."""
    real = weights.save_file

    def full(tensors, path, metadata=None):   # part of the file fits, then the disk is full (as the kernel says)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "save_file", full)
    out = tmp_path / "merged"
    with pytest.raises(OSError) as e:
        commands.merge(commands.MergeConfig(adapter=str(adapter), out=str(out)))
    assert e.value.errno == errno.ENOSPC and str(e.value.strerror).startswith(f"no space left on device writing {out}")
    assert "nothing of it was written (free space, then run it again)" in e.value.strerror
    assert "--resume" not in e.value.strerror and not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="nothing of it was written"):
        commands.convert(commands.ConvertConfig(src=str(base[0]), out=str(out)))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(weights, "save_file", real)
    commands.convert(commands.ConvertConfig(src=str(base[0]), out=str(out)))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(tree(out))


def test_convert_refuses_its_own_source(base):
    before = tree(base[0])
    one_line_error(minicalm("convert", base[0], base[0], "--force"), "convert", "is the folder of the checkpoint converted (")
    assert tree(base[0]) == before


# ----------------------------------------------------------------------------- generate

def test_generate_with_stdin_closed_or_empty_says_where_the_texts_go(adapter):
    for suffix in ("<&-", "</dev/null"):
        one_line_error(minicalm("generate", "--adapter", adapter, "--device", "cpu", shell_suffix=suffix), "generate",
                       "no texts: give them as arguments, or as lines on stdin")


def test_generate_says_what_it_cut_and_which_task_it_assumed(adapter):
    """An adapter without task.json is asked MARC-ja's question, said in one line; a text cut to --max-len too."""
    long = "良い商品です。" * 100
    done = minicalm("generate", "--adapter", adapter, "--device", "cpu", "--max-len", "128", "短い。", long)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    notes = done.stderr.splitlines()
    assert f"{adapter}: no task.json beside the adapter: asking task marc-ja's question (the default); pass --task " \
           f"for another" in notes
    assert f"{long[:30]!r}...: cut to --max-len 128 tokens with the prompt (raise --max-len to answer all of it)" \
           in notes and not any("短い" in n for n in notes)


def test_a_run_folder_given_as_adapter_points_to_its_adapter(adapter, tmp_path):
    run = adapter.parent   # a run folder holds adapter/
    one_line_error(minicalm("generate", "--adapter", run, "--device", "cpu", "良い"), "generate",
                   f"{run} is a training run's folder: its adapter is {adapter}")


# ----------------------------------------------------------------------------- stats, plot

def test_stats_compare_across_base_models_and_depths_says_so(base, adapter, tmp_path):
    """Adapters of different base models (another hidden size) cannot be compared: one line. Different depths (one
    adapts layers the other has not): the shared ones are compared and one line says what was left out."""
    from conftest import hf_tiny
    wide, _ = hf_tiny(tmp_path, "wide", vocab_size=base[1].vocab_size, hidden_size=96, num_attention_heads=4,
                      num_hidden_layers=2)
    deep, _ = hf_tiny(tmp_path, "deep", vocab_size=base[1].vocab_size, num_hidden_layers=3)
    other = make_adapter(wide, tmp_path / "wide-adapter", LoraConfig(), seed=0)
    one_line_error(minicalm("stats", adapter, "--compare", other, "--base", "none", "--out", tmp_path / "s1"),
                   "stats", "with inputs of 64 and 96 features: adapters of different base models cannot be compared")
    assert not (tmp_path / "s1").exists()
    deeper = make_adapter(deep, tmp_path / "deep-adapter", LoraConfig(), seed=0)
    done = minicalm("stats", adapter, "--compare", deeper, "--base", "none", "--out", tmp_path / "s2")
    assert done.returncode == 0, done.stderr
    assert f"compared the 2 modules both adapters adapt; not compared: 0 only in {adapter}, 1 only in {deeper}" \
           in done.stderr
    compared = json.loads((tmp_path / "s2" / "adapter_stats.json").read_text())["compare"]
    assert compared["only_in_compare"] == ["gpt_neox.layers.2.attention.query_key_value"]


def test_plot_counts_the_damaged_lines_it_skips(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) for s in range(1, 7)]
    lines[2], lines[4] = lines[2][:9], "\x00\x00"   # two lines damaged in the middle; the last one torn mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 7, "lo', encoding="utf-8")
    done = minicalm("plot", run)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"{run / 'metrics.jsonl'}: skipped 2 damaged line(s) (line 3, 5)\n"
    assert (run / "plots" / "loss.png").is_file()


def test_every_command_that_writes_refuses_an_out_it_cannot_write_before_working(adapter, base, tmp_path):
    """A file where the folder should be (and, as root, a place no one may write: /sys) is refused at once."""
    file = tmp_path / "file"
    file.write_text("x")
    for args, command in ((["merge", adapter, "--out", file], "merge"), (["convert", base[0], file], "convert"),
                          (["stats", adapter, "--base", "none", "--out", file], "stats")):
        one_line_error(minicalm(*args), command, f"{file}: a file is there, not a folder")
    readonly = Path("/sys/minicalm-test") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if readonly.parent != Path("/sys"):
        readonly.parent.mkdir()
        readonly.parent.chmod(0o555)
    one_line_error(minicalm("stats", adapter, "--base", "none", "--out", readonly), "stats",
                   f"--out {readonly}: cannot write there (")
    assert file.read_text() == "x"
