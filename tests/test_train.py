"""The training loop (minicalm.train, train_lora.py) on a tiny random GPT-NeoX and a 500-token BPE trained here on the
real review text: the loss falls and the adapter reloads; only answer tokens are scored; gradient accumulation,
torchrun and kill-and-resume reproduce the same per-step losses; Ctrl-C saves; bad input fails before training.

Subprocesses run with one thread (as this process does, see conftest) so that their arithmetic matches ours.
"""
from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

T = importlib.import_module("minicalm.train")   # minicalm.train is the function train()
from conftest import FP32_REL, REVIEWS, ROOT, assert_close_to_scale
from minicalm import apply_lora, load_adapter, load_model
from minicalm.loss import IGNORE_INDEX
from minicalm.tasks.data import Example, PromptEncoder, Row, collate, encode_rows, read_examples, read_jsonl
from minicalm.io.adapter import LORA_KEYS
from minicalm.config import BLOCK_LINEARS
from minicalm.loss import answer_loss, shared_prefix_len
from minicalm.tasks.task import MARC_JA
from minicalm.config import LoraConfig
from minicalm.train import TrainConfig, lr_factor, train

MAX_LEN = 128   # the prompt's shared prefix is ~60 tokens with this tokenizer; reviews are cut to fit
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Weights after a few AdamW steps, computed two ways (another micro-batch split, another process count): Adam divides
# each gradient by its own running RMS, so an element whose gradient is small turns the last-bit differences of the
# summation order into a visible difference in its update (measured 6e-5 of the tensor's max |value| under AVX2).
# Allow 1e-3 of the scale: a wrong split or a lost micro-batch changes the weights by the order of their values.
ADAM_REL = 1e-3


def config(folder: Path, out: Path, lora_dropout: float = 0.0, **kw) -> TrainConfig:
    """Small, fast, deterministic settings; kw overrides (lora_dropout: LoRA's dropout, the one LoRA setting varied)."""
    d = dict(model=str(folder), train_file=str(REVIEWS / "train.jsonl"), valid_file="none", out=str(out),
             limit_train=32, batch_size=8, micro_batch_size=8, max_len=MAX_LEN, lr=1e-2, warmup_steps=2,
             max_steps=4, save_every=0, eval_every=0, lora=LoraConfig(dropout=lora_dropout), seed=0, device="cpu",
             dtype="float32", log=False)
    return TrainConfig(**(d | kw))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    return cfg.lr * lr_factor(step, total, cfg)


def flags(cfg: TrainConfig) -> list[str]:
    """The train_lora.py command line for cfg (every field the tests set)."""
    names = ["model", "train_file", "valid_file", "out", "limit_train", "batch_size", "micro_batch_size", "max_len",
             "lr", "warmup_steps", "max_steps", "save_every", "eval_every", "seed", "device", "dtype"]
    return [a for n in names for a in ("--" + n.replace("_", "-"), str(getattr(cfg, n)))] + \
        ["--lora-dropout", str(cfg.lora.dropout)]


def cli(args: list[str]) -> None:
    """Run train_lora.py in this process, as `python train_lora.py ARGS` would."""
    argv = sys.argv
    sys.argv = ["train_lora.py", *args]
    try:
        runpy.run_path(str(ROOT / "train_lora.py"), run_name="__main__")
    finally:
        sys.argv = argv


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's records; a line still being written (no newline yet) is not read."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(ln) for ln in text[: text.rfind("\n") + 1].splitlines() if ln.strip()]


def losses(out: Path) -> list[float]:
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)), "every step logged once, in order"
    return [r["loss"] for r in recs]


def saved_step(out: Path) -> int:
    return torch.load(Path(out) / "state.pt", map_location="cpu", weights_only=False)["step"]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder ({} if it does not exist)."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, err: Path, timeout: float = 120) -> int:
    """Poll metrics.jsonl until it reaches `step`; returns the step seen. The process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = metrics(out)
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before step {step}:\n{err.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s:\n{err.read_text()[-3000:]}")


def batch_of_ids(vocab: int, B: int = 3, T: int = 20) -> torch.Tensor:
    return torch.randint(2, vocab, (B, T), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- schedule

def test_lr_warmup_then_cosine_to_zero():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, 12, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]   # linear warmup, reaching lr
    assert lr_at(4, 12, cfg) == 1.0                                          # the peak
    assert lr_at(8, 12, cfg) == pytest.approx(0.5)                           # halfway down the cosine
    assert lr_at(6, 12, cfg) == pytest.approx(0.5 * (1 + 2 ** -0.5))         # cos(pi/4)
    assert lr_at(12, 12, cfg) == pytest.approx(0.0, abs=1e-12)               # zero at the end
    after = [lr_at(s, 12, cfg) for s in range(4, 13)]
    assert all(a > b for a, b in zip(after, after[1:]))
    lin = TrainConfig(lr=1.0, warmup_steps=4, schedule="linear")
    assert [lr_at(s, 12, lin) for s in (4, 8, 10, 12)] == [1.0, 0.5, 0.25, 0.0]
    assert lr_at(0, 10, TrainConfig(lr=2.0, warmup_steps=0)) == 2.0           # no warmup: start at the peak


# ----------------------------------------------------------------------------- masking and the loss

def test_labels_score_only_the_answer_and_eos(base):
    _, tok = base
    enc = PromptEncoder(tok, MAX_LEN)
    for label in ("positive", "negative"):
        row = Row({"sentence": "とても良い商品でした。"}, label, "r")
        ids, labels, truncated = enc.encode_example(row)
        answer = enc.answer_ids[label] + [tok.eos_token_id]
        assert not truncated and len(ids) == len(labels)
        assert ids == enc.encode_prompt(row)[0] + answer
        scored = [t for t in labels[1:] if t != IGNORE_INDEX]   # the targets the shifted loss sees
        assert scored == answer
        assert labels[: -len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer)) and labels[-len(answer):] == answer
        # train_on_inputs: every real token after the first is a target
        ids2, labels2, _ = enc.encode_example(row, train_on_inputs=True)
        assert ids2 == ids and labels2 == ids
        assert [t for t in labels2[1:] if t != IGNORE_INDEX] == ids[1:]


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_answer_loss_is_plain_cross_entropy_and_ignores_padding(base, train_on_inputs):
    folder, tok = base
    model = load_model(folder)
    enc = PromptEncoder(tok, MAX_LEN)
    reviews = ["とても良い商品でした。", "届いた商品は壊れていて、使えませんでした。返品します。", "普通"]
    examples = [Example(*enc.encode_example(Row({"sentence": r}, lab, "r"), train_on_inputs)[:2])
                for r, lab in zip(reviews, ["positive", "negative", "positive"])]
    assert len({len(e.input_ids) for e in examples}) == 3   # different lengths: the shorter ones get padding
    x, y = collate(examples, tok.pad_token_id)
    for b, e in enumerate(examples):   # padding carries no label
        assert (y[b, len(e.input_ids):] == IGNORE_INDEX).all() and (x[b, len(e.input_ids):] == tok.pad_token_id).all()
    n_real = sum(len(e.input_ids) - 1 for e in examples)
    n_answer = sum(len(enc.answer_ids[lab]) + 1 for lab in ["positive", "negative", "positive"])
    assert int((y[:, 1:] != IGNORE_INDEX).sum()) == (n_real if train_on_inputs else n_answer)

    with torch.no_grad():
        got = answer_loss(model, x, y)
        logits = model(x)                                              # (B, T, V) at every position
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
        alone = sum(answer_loss(model, *collate([e], tok.pad_token_id)) for e in examples)   # no padding at all
        x_other_pad, _ = collate(examples, pad_id=7)                   # what sits in the padding does not matter
        other_pad = answer_loss(model, x_other_pad, y)
    assert_close_to_scale(got, want)        # a summed loss of a few hundred: other reduction orders
    assert_close_to_scale(got, alone)
    assert torch.equal(got, other_pad)      # the padding's ids never reach a real token: the same arithmetic


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_first_step_loss_is_the_mean_over_scored_tokens(base, tmp_path, train_on_inputs):
    """One step over 16 examples as 2 micro-batches: its logged loss is the base model's summed cross-entropy over
    the scored tokens (answer + eos, or every real token) divided by their count over the whole global batch."""
    folder, tok = base
    cfg = config(folder, tmp_path / "run", limit_train=16, batch_size=16, micro_batch_size=8, max_steps=1,
                 train_on_inputs=train_on_inputs)
    train(cfg)
    enc, model = PromptEncoder(tok, MAX_LEN), load_model(folder)   # B = 0: the first forward is the base model's
    total, count = 0.0, 0
    for r in read_jsonl(REVIEWS / "train.jsonl", limit=16):
        ids, labels, _ = enc.encode_example(r, train_on_inputs)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1]
        total += F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum").item()
        count += sum(t != -100 for t in labels[1:])
    assert losses(tmp_path / "run")[0] == pytest.approx(total / count, rel=FP32_REL)


# ----------------------------------------------------------------------------- LoRA training end to end

def test_training_lowers_loss_and_writes_a_loadable_adapter(base, tmp_path):
    folder, tok = base
    before = tree(folder)
    out = tmp_path / "run"
    cfg = config(folder, out, limit_train=64, max_steps=30, warmup_steps=5, lora_dropout=0.05, save_every=10,
                 valid_file=str(REVIEWS / "valid.jsonl"), eval_limit=16, eval_every=10)
    res = train(cfg)
    recs = metrics(out)
    loss = losses(out)
    assert len(loss) == 30 and res["step"] == 30 and saved_step(out) == 30
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.3, loss   # from ~ln 500 = 6.2; the random frozen head caps it
    assert [r["lr"] for r in recs] == pytest.approx([lr_at(s, 30, cfg) for s in range(30)])
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] and res["val_loss"] == vals[-1]
    assert all(r["grad_norm"] is not None and r["tokens_per_s"] > 0 for r in recs)

    # the frozen base is untouched, in memory and on disk; only LoRA tensors are checkpointed
    trained = res["model"].eval()
    fresh = load_model(folder)
    base_keys = [k for k in trained.state_dict() if not k.endswith(LORA_KEYS)]
    assert set(base_keys) == set(fresh.state_dict())
    assert all(torch.equal(trained.state_dict()[k], fresh.state_dict()[k]) for k in base_keys)
    assert tree(folder) == before
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    assert state["trainable"] and all(k.endswith(LORA_KEYS) for k in state["trainable"])

    # the adapter on disk, loaded into a freshly loaded base, is the trained model
    ids = batch_of_ids(tok.vocab_size)
    with torch.no_grad():
        want, base_logits = trained(ids), fresh(ids)
        load_adapter(fresh, out / "adapter")
        got = fresh(ids)
    assert torch.equal(got, want)   # the same fp32 adapter values and the same ops: exact on every kernel set
    assert (want - base_logits).abs().max() > 1e-3   # and it is not the base model
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 30


def test_gradient_accumulation_matches_one_big_micro_batch(base, tmp_path):
    """The same global batch of 16 as 2 micro-batches of 8 or 1 of 16: the same losses step after step (fp32)."""
    folder, _ = base
    kw = dict(limit_train=32, batch_size=16, max_steps=4)   # 2 steps an epoch, 2 epochs
    a = train(config(folder, tmp_path / "a", micro_batch_size=8, **kw))
    b = train(config(folder, tmp_path / "b", micro_batch_size=16, **kw))
    c = train(config(folder, tmp_path / "c", micro_batch_size=4, grad_checkpoint=True, **kw))   # 4 x 4, recomputed
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 4 and la == pytest.approx(lb, rel=FP32_REL)   # another summation order: equal to rounding
    assert losses(tmp_path / "c") == pytest.approx(lb, rel=FP32_REL) and c["step"] == 4
    assert len(set(la)) == 4   # the steps saw different batches / weights
    pa, pb = a["model"].state_dict(), b["model"].state_dict()
    for k in pa:
        assert_close_to_scale(pa[k], pb[k], ADAM_REL, k)


# ----------------------------------------------------------------------------- kill, Ctrl-C, resume

# Runs train_lora.py; from step 4 on each step's end is slowed (0.2 s) and at step 6, before that step's checkpoint,
# the process parks, so that the test's SIGKILL lands while it is running, between the checkpoints of steps 3 and 6.
SLOW_AFTER_4 = """
import runpy, sys, time
from tqdm import tqdm
update = tqdm.update
def slow(self, n=1):
    update(self, n)
    if self.n >= 4:
        time.sleep(0.2 if self.n < 6 else 600)
tqdm.update = slow
sys.argv = ["train_lora.py"] + sys.argv[1:]
runpy.run_path("train_lora.py", run_name="__main__")
"""


def test_kill_and_resume_equals_an_uninterrupted_run(base, tmp_path, capsys):
    folder, _ = base
    kw = dict(max_steps=8, save_every=3, lora_dropout=0.1)   # 32 examples / 8: 4 steps an epoch, 2 epochs
    train(config(folder, tmp_path / "a", **kw))
    want = losses(tmp_path / "a")

    cfg = config(folder, tmp_path / "b", **kw)
    err = tmp_path / "b.err"
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_4, *flags(cfg)], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=ef)
        try:
            wait_for_step(proc, cfg.out, 4, err)
            with pytest.raises(FileExistsError, match=rf"{cfg.out} is in use by another run \(pid {proc.pid} on "):
                train(replace(cfg, resume=True))   # one run per folder: the second is refused, the first goes on
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    seen = metrics(cfg.out)[-1]["step"]
    assert 4 <= seen <= 6 and saved_step(cfg.out) == 3   # metrics ran past the last checkpoint
    assert not list(Path(cfg.out).rglob(".*.tmp*"))       # no half-written files left behind
    assert json.loads((Path(cfg.out) / "run.lock").read_text())["pid"] == proc.pid   # the killed run's lock

    cli(flags(cfg) + ["--resume"])   # takes over the dead process's lock (and says so), and releases it at the end
    assert f"taking over the lock of process {proc.pid}, which is no longer running" in capsys.readouterr().err
    assert not (Path(cfg.out) / "run.lock").exists()
    got = losses(cfg.out)   # steps 4..seen were dropped on resume and ran again: each step is logged once
    assert len(got) == 8 and saved_step(cfg.out) == 8
    # Exact: the resumed steps run the same ops on the same shapes from the saved fp32 state, with the same kernels
    # (the subprocess inherits ATEN_CPU_CAPABILITY and runs one thread, as this process does).
    assert got == want


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(base, tmp_path, sig, code):
    folder, _ = base
    cfg = config(folder, tmp_path / "run", max_steps=10_000, save_every=1000)   # far from the next checkpoint
    err = tmp_path / "err"
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), *flags(cfg)], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=ef)
        try:
            wait_for_step(proc, cfg.out, 2, err)
            proc.send_signal(sig)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = err.read_text()
    assert rc == code, log[-3000:]   # 128 + the signal, as shells expect: `train && eval` does not go on
    assert "Traceback" not in log and f"stopped ({sig.name}): checkpoint at step" in log
    last = metrics(cfg.out)[-1]["step"]
    assert last >= 2 and saved_step(cfg.out) == last   # the step in flight finished and was saved
    assert (Path(cfg.out) / "adapter" / "adapter_model.safetensors").is_file()

    cli(flags(cfg) + ["--resume", "--max-steps", str(last + 2)])   # the later flag wins
    assert [r["step"] for r in metrics(cfg.out)] == list(range(1, last + 3)) and saved_step(cfg.out) == last + 2


def test_max_time_stops_and_saves(base, tmp_path):
    folder, _ = base
    res = train(config(folder, tmp_path / "run", max_steps=1000, max_time=1e-9))   # exceeded after the first step
    assert res["step"] == 1 and res["total_steps"] == 1000 and saved_step(tmp_path / "run") == 1
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_match_one(base, tmp_path):
    folder, _ = base
    kw = dict(limit_train=32, batch_size=16, micro_batch_size=8, max_steps=4)
    cfg = config(folder, tmp_path / "ddp", **kw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "train_lora.py"), *flags(cfg)]
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    train(config(folder, tmp_path / "one", **kw))                        # 2 micro-batches in one process
    train(config(folder, tmp_path / "one16", **kw | dict(micro_batch_size=16)))
    ddp = losses(tmp_path / "ddp")
    assert len(ddp) == 4
    # all_reduce sums the ranks' gradients in another order: equal to rounding, not bit for bit
    assert ddp == pytest.approx(losses(tmp_path / "one"), rel=FP32_REL)
    assert ddp == pytest.approx(losses(tmp_path / "one16"), rel=FP32_REL)
    a = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for k in b:
        assert_close_to_scale(a[k], b[k], ADAM_REL, k)


# ----------------------------------------------------------------------------- bad input and blow-ups

def write(path: Path, lines: list) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln, ensure_ascii=False)) + "\n"
                            for ln in lines), encoding="utf-8")
    return str(path)


GOOD = {"sentence": "良い", "label": "positive", "review_id": "r0"}


@pytest.mark.parametrize("case", ["bad_json", "bad_label", "empty_file", "limit_zero", "missing_file",
                                  "batch_split", "other_run", "resume_nothing"])
def test_bad_input_fails_before_training(base, tmp_path, monkeypatch, case):
    folder, _ = base
    out = tmp_path / "run"
    kw = {}
    if case == "bad_json":
        kw["train_file"] = f = write(tmp_path / "t.jsonl", [GOOD, GOOD, '{"sentence": "x", "label": '])
        err, match = ValueError, re.escape(f"{f}:3: not valid JSON")
    elif case == "bad_label":
        kw["train_file"] = f = write(tmp_path / "t.jsonl", [GOOD, "", GOOD | {"label": "neutral"}])
        err, match = ValueError, re.escape(f"{f}:3: unknown label 'neutral'")
    elif case == "empty_file":
        kw["train_file"] = f = write(tmp_path / "t.jsonl", ["", "  "])
        err, match = ValueError, re.escape(f"{f}: no rows in the file")
    elif case == "limit_zero":
        kw["limit_train"], err, match = 0, ValueError, "TrainConfig.limit_train: must be at least 1, got 0"
    elif case == "missing_file":
        kw["train_file"] = f = str(tmp_path / "absent.jsonl")
        err, match = FileNotFoundError, re.escape(f"{f}: no such file")
    elif case == "batch_split":
        kw.update(batch_size=12, micro_batch_size=8)
        err, match = ValueError, re.escape("TrainConfig.batch_size: must be a positive multiple of micro_batch_size 8, got 12")
    elif case == "other_run":
        train(config(folder, out, max_steps=1))
        err, match = FileExistsError, "already holds a run's checkpoint .*pass --resume"
    else:
        kw["resume"], err, match = True, FileNotFoundError, "--resume: no checkpoint"
    before = tree(out)

    def never(*a, **k):
        raise AssertionError("the model was loaded: the error came too late")
    monkeypatch.setattr(T, "load_model", never)
    monkeypatch.setattr(T, "preflight", never)
    with pytest.raises(err, match=match):
        train(config(folder, out, **kw))
    assert tree(out) == before   # nothing written (or, for another run's folder, nothing changed)
    if case != "other_run":
        assert not out.exists()


def test_a_task_without_data_names_the_flags_to_pass(base, tmp_path):
    task = tmp_path / "t.json"
    task.write_text(json.dumps({"name": "t", "prompt": "{text}:", "labels": {"a": "A", "b": "B"}}))
    with pytest.raises(FileNotFoundError, match=r"task t names no train data on the hub: pass --train-file \(JSON "
                                                r"lines with text, label\)"):
        train(config(base[0], tmp_path / "run", task=str(task), train_file=None))
    rows = write(tmp_path / "t.jsonl", [{"text": "良い", "label": "a"}, {"text": "悪い", "label": "b"}])
    with pytest.raises(FileNotFoundError, match="task t names no validation data on the hub: pass --valid-file"):
        train(config(base[0], tmp_path / "run", task=str(task), train_file=rows, valid_file=None))


def test_peak_memory_reads_ru_maxrss_in_the_platform_s_unit(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS."""
    import minicalm.tools.run as R
    monkeypatch.setattr(R.resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": 1000})())
    for platform, expected in (("linux", 1024_000), ("darwin", 1000)):
        monkeypatch.setattr(R.sys, "platform", platform)
        assert R.peak_memory(torch.device("cpu")) == expected


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    folder, _ = base
    out = tmp_path / "run"
    train(config(folder, out, max_steps=2, save_every=2))
    kept = tree(out)

    loss = T.answer_loss   # from now on every loss is inf (as after a weight overflowed)
    monkeypatch.setattr(T, "answer_loss", lambda *a, **k: loss(*a, **k) * math.inf)
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf at step 3; the last good checkpoint is kept in"):
        train(config(folder, out, max_steps=4, save_every=1, resume=True))
    now = tree(out)
    assert now.pop("train_config.json") != kept.pop("train_config.json")   # rewritten on resume (the new settings)
    assert now == kept and saved_step(out) == 2 and len(metrics(out)) == 2

    with pytest.raises(FloatingPointError, match="at step 1; no checkpoint was written yet"):   # nothing saved
        train(config(folder, tmp_path / "fresh", save_every=1))
    assert not (tmp_path / "fresh" / "state.pt").exists() and metrics(tmp_path / "fresh") == []
    monkeypatch.setattr(T, "answer_loss", loss)

    # lr 1e6 on every parameter: finite at first, then the loss blows up; the run stops at the first bad step
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+);.*lower lr") as e:
        train(config(folder, tmp_path / "lr", full=True, lr=1e6, warmup_steps=0, max_steps=6, save_every=1))
    bad = int(e.value.args[0].split(" at step ")[1].split(";")[0])
    assert bad > 1 and saved_step(tmp_path / "lr") == bad - 1 and len(metrics(tmp_path / "lr")) == bad - 1


# ----------------------------------------------------------------------------- pretraining the miniature

def test_full_parameter_text_mode_trains_every_parameter(base, tmp_path):
    folder, tok = base
    out = tmp_path / "pre"
    res = train(config(folder, out, full=True, text=True, max_len=64, limit_train=64, batch_size=8, lr=3e-3,
                       warmup_steps=0, max_steps=12, valid_file=str(REVIEWS / "valid.jsonl"), eval_limit=32))
    loss = losses(out)
    assert len(loss) == 12 and sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss
    assert res["val_loss"] is not None and res["val_loss"] < loss[0]
    fresh, trained = load_model(folder), res["model"]
    for name, p in trained.named_parameters():
        assert not torch.equal(p.detach(), fresh.state_dict()[name]), f"{name} did not change"
    reloaded = load_model(out / "model")   # an ordinary checkpoint folder, tokenizer included
    assert reloaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert (out / "model" / "tokenizer.json").is_file() and not (out / "adapter").exists()

    # raw-text mode: every token of the packed blocks is a target (the loss is the LM loss of the blocks)
    blocks = read_examples(REVIEWS / "train.jsonl", MARC_JA, tok, 64, limit=64, text=True)
    assert all(e.labels == e.input_ids and len(e.input_ids) == 64 for e in blocks)


# ----------------------------------------------------------------------------- the script

def test_train_lora_help_lists_every_flag(capsys):
    """Every TrainConfig setting is a flag; a switch has both forms (--x, --no-x)."""
    from dataclasses import fields
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    names = {f.name for f in fields(TrainConfig)} - {"lora"}
    flags_ = {"--" + n.replace("_", "-") for n in names}
    flags_ |= {"--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets", "--use-dora", "--use-rslora",
               "--lora-init"}
    assert len(flags_) == 42
    for flag in flags_:
        assert f"  {flag}" in text, flag
    for switch in ("share-prefix", "resume", "use-dora", "grad-checkpoint", "train-on-inputs"):   # both forms
        assert f"  --{switch}, --no-{switch}" in text, switch


def test_config_file_reruns_a_run_from_its_train_config(base, tmp_path):
    """--config RUN/train_config.json takes every setting the run used (the nested LoRA ones included); flags given
    with it override: the same settings into another folder give the same losses."""
    folder, _ = base
    first = config(folder, tmp_path / "a", lora_dropout=0.1, max_steps=3)
    cli(flags(first) + ["--lora-r", "4", "--lora-alpha", "8"])
    recorded = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert (recorded["lora"]["r"], recorded["lora"]["alpha"], recorded["lora"]["dropout"]) == (4, 8.0, 0.1)
    cli(["--config", str(tmp_path / "a" / "train_config.json"), "--out", str(tmp_path / "b")])
    again = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert again == recorded | {"out": str(tmp_path / "b")}
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 3


@pytest.mark.parametrize("change, named", [
    (dict(lr=2e-2), "--lr 0.01 now 0.02"), (dict(weight_decay=0.5), "--weight-decay 0.0 now 0.5"),
    (dict(lora=LoraConfig(dropout=0.1)), "--lora-dropout 0.0 now 0.1"), (dict(seed=1), "--seed 0 now 1"),
    (dict(batch_size=16, micro_batch_size=8), "--batch-size 8 now 16"),
    (dict(grad_clip=0.5), "--grad-clip 1.0 now 0.5"),
    (dict(revision="v2"), "--revision None now 'v2'"), ("model", "--model '"), ("rows", "the training examples differ"),
])
def test_resume_refuses_what_it_cannot_honour(base, tmp_path, monkeypatch, change, named):
    """A resumed run keeps the base, the data, the adapter's and the optimizer's settings, the seed and the batch
    size of its checkpoint: a change is named, before the model loads, and nothing is written."""
    folder, _ = base
    out, kw = tmp_path / "run", {}
    if change == "rows":   # the same path, other rows in it
        kw["train_file"] = rows = tmp_path / "rows.jsonl"
        lines = (REVIEWS / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        rows.write_text("".join(lines), encoding="utf-8")
        change = {}
    train(config(folder, out, max_steps=2, save_every=1, **kw))
    if kw:
        rows.write_text("".join(lines[::-1]), encoding="utf-8")
    if change == "model":   # another checkpoint of the same shapes: other weights in another folder
        other = shutil.copytree(folder, tmp_path / "other")
        weights = load_file(other / "model.safetensors")
        save_file(weights | {"embed_out.weight": weights["embed_out.weight"] + 1}, other / "model.safetensors")
        change = dict(model=str(other))
    before = tree(out)
    monkeypatch.setattr(T, "load_model", lambda *a, **k: pytest.fail("the model was loaded: the error came too late"))
    kw |= dict(max_steps=4, resume=True) | change
    with pytest.raises(ValueError, match="--resume: ") as e:
        train(config(kw.pop("model", folder), out, **kw))
    assert named in str(e.value) and "\n" not in str(e.value) and tree(out) == before


def test_resume_may_change_where_and_how_long_and_how_a_step_is_computed(base, tmp_path):
    """The data file may move (the same rows elsewhere), the micro-batch size and the run's length may change; the
    run's train_config.json then says what the resumed run used."""
    folder, _ = base
    train(config(folder, tmp_path / "run", max_steps=2, save_every=1))
    moved = str(shutil.copy(REVIEWS / "train.jsonl", tmp_path / "moved.jsonl"))
    res = train(config(folder, tmp_path / "run", max_steps=3, resume=True, micro_batch_size=4, train_file=moved,
                       eval_every=1))
    assert res["step"] == 3 and saved_step(tmp_path / "run") == 3
    used = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (used["max_steps"], used["micro_batch_size"], used["train_file"]) == (3, 4, moved)


def test_a_moved_base_resumes_and_a_gone_one_names_the_way_out(base, tmp_path, capsys):
    """The base is compared by what it is (its weights' fingerprint), as the data files are: moved to another folder
    it resumes, saying so; gone from where it was, the refusal names the way out (before the model loads)."""
    folder, _ = base
    moved = shutil.copytree(folder, tmp_path / "base")
    train(config(moved, tmp_path / "run", max_steps=2, save_every=1))
    want = losses(tmp_path / "run")
    shutil.move(moved, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=re.escape(f"--resume: the base model {moved} that {tmp_path / 'run'}"
                                                   f"/state.pt was trained on is not there any more; if it moved, pass "
                                                   f"--model with its new folder")):
        train(config(moved, tmp_path / "run", max_steps=3, resume=True))
    res = train(config(tmp_path / "elsewhere", tmp_path / "run", max_steps=3, resume=True))
    assert res["step"] == 3 and losses(tmp_path / "run")[:2] == want
    assert f"the base moved from {moved} to {tmp_path / 'elsewhere'} (the same weights)" in capsys.readouterr().err
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "elsewhere")   # the adapter names where it is now


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "foreign"])
def test_a_damaged_state_pt_is_one_line_before_the_model_loads(base, tmp_path, monkeypatch, damage):
    folder, _ = base
    out = tmp_path / "run"
    train(config(folder, out, max_steps=1))
    state = out / "state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "empty":
        state.write_bytes(b"")
    elif damage == "garbage":
        state.write_bytes(os.urandom(1000))
    else:
        torch.save({"weights": torch.zeros(3)}, state)   # a readable torch file, but not a run's checkpoint
    monkeypatch.setattr(T, "load_model", lambda *a, **k: pytest.fail("the model was loaded: the error came too late"))
    with pytest.raises(ValueError) as e:
        train(config(folder, out, max_steps=2, resume=True))
    msg = str(e.value)
    assert msg.startswith(f"--resume: {state} cannot be read (") and "start the run over in another --out" in msg
    assert "\n" not in msg and "weights_only" not in msg


def test_one_run_per_folder(tmp_path, capsys):
    """run.lock: taken atomically with this process's pid and host, released on exit; a live holder or one on another
    host is refused naming it; a dead holder's lock and its killed saves' temporary files are cleaned up."""
    from minicalm.tools.run import RunFolder
    folder = RunFolder(tmp_path / "run")
    with folder.locked():
        held = json.loads(folder.lock_file.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(FileExistsError, match=rf"run is in use by another run \(pid {os.getpid()} on "), \
                RunFolder(tmp_path / "run").locked():
            pass
    assert not folder.lock_file.exists() and not folder.path.exists()   # made for the run, left empty: removed
    folder.path.mkdir()
    folder.lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(FileExistsError, match=r"\(pid 1 on elsewhere, since then\).*delete .*run\.lock"), \
            folder.locked():
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    (folder.path / "adapter").mkdir()
    torn = folder.path / "adapter" / f".adapter_model.safetensors.tmp{int(dead.stdout)}"
    torn.write_bytes(b"")
    with folder.locked():
        assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid() and not torn.exists()
    err = capsys.readouterr().err
    assert f"taking over the lock of process {int(dead.stdout)}" in err and f"removed {torn}" in err


def hold_the_lock(path, barrier, holders, most, took, stale_pid) -> None:
    """A process racing the others into one run folder: enter together (the barrier), count how many hold the lock
    at once while holding it a moment."""
    from minicalm.tools.run import RunFolder
    barrier.wait()
    try:
        with RunFolder(path).locked():
            with holders.get_lock():
                holders.value += 1
                most.value = max(most.value, holders.value)
            time.sleep(0.05)
            with holders.get_lock():
                holders.value -= 1
            took.value += 1
    except FileExistsError:
        pass


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-folder", "dead-holder's-lock"])
def test_runs_entering_one_folder_together_never_both_hold_it(tmp_path, stale):
    """Three processes take the lock at the same moment (a barrier), 40 times: never two at once, at least one each
    time; with a dead process's lock in the folder too (all three want to take it over)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")   # the children inherit the imports: they start at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for trial in range(40):
        path = tmp_path / f"run{trial}"
        if stale:
            path.mkdir()
            (path / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
        barrier, holders, most, took = ctx.Barrier(3), ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
        procs = [ctx.Process(target=hold_the_lock, args=(path, barrier, holders, most, took, None)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert most.value == 1 and took.value >= 1, (trial, most.value, took.value)
        assert not (path / "run.lock").exists()


def test_an_empty_lock_file_is_not_a_process(tmp_path):
    """A lock file left empty (a run killed as it began writing it) is taken without naming a process None."""
    from minicalm.tools.run import RunFolder
    path = tmp_path / "run"
    path.mkdir()
    (path / "run.lock").write_text("")
    with RunFolder(path).locked():
        assert json.loads((path / "run.lock").read_text())["pid"] == os.getpid()


def test_max_len_past_the_model_s_positions_is_refused_before_the_data(base, tmp_path, monkeypatch):
    folder, _ = base   # 256 positions
    monkeypatch.setattr(T, "run_data", lambda *a, **k: pytest.fail("the data was read: the error came too late"))
    with pytest.raises(T.SettingError) as e:
        train(config(folder, tmp_path / "run", max_len=1024))
    assert (e.value.name, e.value.message) == ("max_len", f"1024 tokens, past the model's 256 positions "
                                                          f"(max_position_embeddings); an example must fit the model "
                                                          f"{folder}: lower it to 256 or less")
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_reruns_from_its_train_config_and_a_finished_one_says_so(base, tmp_path, capsys):
    """train_config.json records what to rerun, not how the run was started: after a resume it still reruns into a
    new folder (the README's recipe); resuming a run that is done says there is nothing to train."""
    folder, _ = base
    cli(flags(config(folder, tmp_path / "a", max_steps=2, save_every=1)))
    cli(flags(config(folder, tmp_path / "a", max_steps=3, save_every=1)) + ["--resume"])
    recorded = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert "resume" not in recorded and recorded["max_steps"] == 3
    cli(["--config", str(tmp_path / "a" / "train_config.json"), "--out", str(tmp_path / "b")])
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    capsys.readouterr()
    cli(flags(config(folder, tmp_path / "a", max_steps=3, log=True)) + ["--resume"])
    err = capsys.readouterr().err
    assert f"nothing to train: {tmp_path / 'a'} is at step 3 of 3 already (raise --epochs or --max-steps" in err
    assert "nan" not in err
    cli(["--config", str(tmp_path / "a" / "train_config.json"), "--out", str(tmp_path / "c"), "--max-steps", "1",
         "--no-share-prefix", "--share-prefix"])   # a switch has both forms; the later one wins
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["share_prefix"] is True


def test_a_full_disk_while_logging_says_which_file_and_what_is_kept(base, tmp_path, monkeypatch):
    from minicalm.io import files
    with pytest.raises(OSError) as e:
        files.append_line("/dev/full", "{}")   # the kernel's own ENOSPC
    assert e.value.errno == errno.ENOSPC and e.value.strerror.startswith("appending to /dev/full failed: no space")
    import minicalm.tools.run as R
    real = R.append_line

    def fills(path, line):
        if json.loads(line)["step"] == 3:
            raise OSError(errno.ENOSPC, f"appending to {path} failed: no space left on device (0 MiB free)")
        real(path, line)

    monkeypatch.setattr(R, "append_line", fills)
    with pytest.raises(OSError) as e:
        train(config(base[0], tmp_path / "run", save_every=1))
    assert e.value.strerror == (f"appending to {tmp_path / 'run' / 'metrics.jsonl'} failed: no space left on device "
                                f"(0 MiB free); the last good checkpoint is kept in {tmp_path / 'run'}; once there is "
                                f"room, --resume continues from it")
    assert saved_step(tmp_path / "run") == 2


@pytest.mark.parametrize("args, says", [
    (["--batch-size", "12"], "--batch-size: must be a positive multiple of micro_batch_size 8, got 12"),
    (["--batch-size", "0"], "--batch-size: must be a positive multiple of micro_batch_size 8, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size: must be at least 1, got 0"),
    (["--grad-clip", "-1"], "--grad-clip: must be >= 0 (0: off), got -1.0"),
    (["--max-steps", "0"], "--max-steps: must be at least 1, got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be >= 0 (0: off), got -1"),
    (["--save-every", "-1"], "--save-every: must be >= 0 (0: off), got -1"),
    (["--eval-every", "-1"], "--eval-every: must be >= 0 (0: off), got -1"),
    (["--lora-r", "0"], "--lora-r: the rank must be a positive integer, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha: must be a positive number (the update's scale is alpha / r), got 0.0"),
    (["--lr", "nan"], "--lr: must be positive, got nan"),
    (["--device", "cuda:99"], "device 'cuda:99'"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_train_lora_refuses_a_bad_setting_in_one_line_before_anything(base, tmp_path, capsys, args, says):
    """Each refusal is one line naming the flag, exit status 1, nothing written (the flags checked where the settings
    dataclass is built; the device where the processes start)."""
    folder, _ = base
    cfg = config(folder, tmp_path / "run", micro_batch_size=8)
    with pytest.raises(SystemExit) as e:
        cli(flags(cfg) + args)   # the later flag wins
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"train_lora.py: error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_failed_run_exits_1_in_a_subprocess(base, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), *flags(config(base[0], tmp_path / "run")),
                          "--grad-clip", "-1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr == "train_lora.py: error: --grad-clip: must be >= 0 (0: off), got -1.0\n"


# ----------------------------------------------------------------------------- the shared prompt prefix

@pytest.mark.parametrize("train_on_inputs", [False, True], ids=["answer-only", "train-on-inputs"])
@pytest.mark.parametrize("kind", ["qkv", "all-four", "full"])
def test_shared_prefix_gives_the_same_loss_and_gradients(base, kind, train_on_inputs):
    """A micro-batch of 6 real prompts: the loss and every trainable gradient with the prefix computed once equal
    those of running every row in full (dropout 0, fp32), and the loss is transformers' on the same batch."""
    folder, tok = base
    model = load_model(folder).train()
    if kind == "full":
        model.requires_grad_(True)
    else:
        apply_lora(model, targets=("query_key_value",) if kind == "qkv" else BLOCK_LINEARS, r=4, alpha=8, dropout=0.0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():   # B starts at zero, which would leave every lora_A gradient zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    enc = PromptEncoder(tok, MAX_LEN)
    examples, _ = encode_rows(enc, read_jsonl(REVIEWS / "train.jsonl", limit=6), train_on_inputs)
    x, y = collate(examples, tok.pad_token_id)
    P = shared_prefix_len(x)
    assert len(enc.prefix_ids) <= P < min(len(e.input_ids) for e in examples)   # the prefix: most of each prompt
    runs = {}
    for shared in (0, P):
        model.zero_grad()
        loss = answer_loss(model, x, y, prefix=shared)
        loss.backward()
        runs[shared] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (loss0, grads0), (loss1, grads1) = runs[0], runs[P]
    assert loss1.item() == pytest.approx(loss0.item(), rel=FP32_REL)
    assert grads0.keys() == grads1.keys() and len(grads0) == {"qkv": 4, "all-four": 16}.get(kind, 28)
    for name in grads0:
        assert grads0[name].abs().max() > 0, name
        assert_close_to_scale(grads1[name], grads0[name], msg=name)
    if kind == "full":   # the base weights: transformers' loss on the same batch
        from transformers import GPTNeoXForCausalLM
        hf = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(x).logits[:, :-1]
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), reduction="sum")
        assert loss1.item() == pytest.approx(want.item(), rel=FP32_REL)


def test_train_lora_losses_with_and_without_sharing(base, tmp_path):
    """A few train_lora.py steps (2 micro-batches each, validation included): the same per-step losses whether the
    prompt prefix is computed once per micro-batch (the default) or in every row (--no-share-prefix)."""
    folder, _ = base
    kw = dict(batch_size=16, micro_batch_size=8, max_steps=4, eval_every=2, valid_file=str(REVIEWS / "valid.jsonl"),
              eval_limit=12)
    cli(flags(config(folder, tmp_path / "shared", **kw)))
    cli(flags(config(folder, tmp_path / "unshared", **kw)) + ["--no-share-prefix"])
    shared, unshared = metrics(tmp_path / "shared"), metrics(tmp_path / "unshared")
    assert [r["loss"] for r in shared] == pytest.approx([r["loss"] for r in unshared], rel=1e-4)
    assert [r["val_loss"] for r in shared if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in unshared if "val_loss" in r], rel=1e-4)
    assert len([r for r in shared if "val_loss" in r]) == 2
    assert [json.loads((tmp_path / d / "train_config.json").read_text())["share_prefix"]
            for d in ("shared", "unshared")] == [True, False]


def test_compile_gives_the_same_losses(base, tmp_path, monkeypatch):
    """--compile (each block through torch.compile, dynamic shapes): the same losses as eager, to rounding (the
    compiled kernels fuse operations). CI runs this once, not under every ATEN_CPU_CAPABILITY: inductor's code picks
    its own vector instructions.

    It compiles into a cache folder of its own: torch 2.13's inductor cache is not keyed by ATEN_CPU_CAPABILITY, and
    kernels cached under AVX-512 then reused under ATEN_CPU_CAPABILITY=avx2 gave NaN losses here."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder, _ = base
    eager = train(config(folder, tmp_path / "eager", max_steps=2))
    compiled = train(config(folder, tmp_path / "compiled", max_steps=2, compile=True))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=FP32_REL)
    assert compiled["step"] == eager["step"] == 2


def test_local_paths_are_recorded_whole(base, monkeypatch):
    """A local --model (and task or data file) is recorded as an absolute path, so the adapter finds its base from
    any folder; a hub id and a built-in task's name stay as they are."""
    folder, _ = base
    monkeypatch.chdir(folder.parent)
    cfg = TrainConfig(model=folder.name, train_file=str(REVIEWS / "train.jsonl"))
    assert cfg.model == str(folder.resolve()) and Path(cfg.train_file).is_absolute() and cfg.task == "marc-ja"
    assert TrainConfig(model="cyberagent/open-calm-7b").model == "cyberagent/open-calm-7b"
