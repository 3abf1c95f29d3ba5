"""A training run's bookkeeping, outside the loop (train.py): the processes torchrun starts, the signals that stop a
run, the run folder (its settings, metrics.jsonl, state.pt) and resuming from it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import resource
import signal
import socket
import sys
import time
from array import array
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.files import atomic_write, read_records, remove_stale_temps, running, write_json, write_text
from .cli import flag_name, flatten


# ----------------------------------------------------------------------------- processes

@dataclass
class Processes:
    """This process's place among the ones torchrun started (one process without torchrun)."""
    rank: int
    world: int
    device: torch.device
    pinned: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4))

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or op) t over the processes, in place. The tensor stays referenced here until the process group is
        left: gloo's worker thread drops its own reference just after the collective returns, and if that were the
        last one it would need the GIL, which the interpreter may be holding while it exits (an abort)."""
        if self.world > 1:
            dist.all_reduce(t, op=op)
            self.pinned.append(t)
        return t


@contextmanager
def processes(device: str):
    """Join torchrun's process group (WORLD_SIZE, RANK, LOCAL_RANK; NCCL on GPUs, gloo on CPU) and leave it on exit."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a device name torch knows (cpu, cuda, cuda:N, mps)") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= gpus:
        raise ValueError(f"device {device!r}: " + (f"this machine has {gpus} GPU(s)" if gpus else
                                                  f"this torch has no CUDA (torch {torch.__version__}); use cpu"))
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    proc = Processes(rank, world, dev)
    try:
        yield proc
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()   # joins gloo's workers; the pinned tensors go after them
        proc.pinned.clear()


class StopSignals:
    """Ctrl-C and SIGTERM (schedulers, torchrun) ask the run to stop; the loop saves and stops between steps. The
    handlers that were there before come back on exit."""

    def __init__(self):
        self.reason: str | None = None

    def __enter__(self) -> "StopSignals":
        self.handlers = {sig: signal.signal(sig, self.ask) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def ask(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)

    def agreed(self, proc: Processes, out_of_time: bool) -> bool:
        """Whether to stop after this step, the same answer in every process (or one would wait forever)."""
        if out_of_time and self.reason is None:
            self.reason = "max_time"
        flag = proc.all_reduce(torch.tensor(float(self.reason is not None), device=proc.device), dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "another process"
        return self.reason is not None


def peak_memory(device: torch.device) -> int:
    """Peak bytes: accelerator memory allocated on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024   # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- the run folder

# What a resumed run may change: where it writes and how long it runs, how often and on what it validates, how often
# it saves, and how a step is computed (the same examples, the same gradient to rounding). Everything else in
# TrainConfig (the base and its revision, the task, the LoRA and optimizer settings, the seed, the batch size, the
# dtype) must be the checkpoint's; the training file may move, but its examples must be the same (data_digest).
RESUME_MAY_CHANGE = ("out", "resume", "log", "epochs", "max_steps", "max_time", "eval_every", "eval_limit",
                     "eval_accuracy", "save_every", "device", "micro_batch_size", "grad_checkpoint", "compile",
                     "train_file", "valid_file")
STATE_KEYS = ("step", "config", "optimizer", "scaler", "trainable")


def data_digest(examples: list) -> str:
    """A fingerprint of the training examples (token ids and labels): what the run trains on, wherever the file is."""
    h = hashlib.sha256()
    for e in examples:
        h.update(array("q", e.input_ids).tobytes() + b"|" + array("q", e.labels).tobytes() + b";")
    return h.hexdigest()


class RunFolder:
    """A run's --out: train_config.json and task.json (what it was asked), metrics.jsonl (one line per step),
    state.pt (what resuming needs), adapter/ (or model/ for full training), and run.lock while a run works in it.
    Every file is written atomically but metrics.jsonl, which grows by a line per step (start() cuts a torn or rerun
    tail)."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.state_file = self.path / "state.pt"
        self.lock_file = self.path / "run.lock"

    @contextmanager
    def locked(self, enabled: bool = True):
        """One run at a time in this folder: run.lock holds the pid and host of the run working here, taken
        atomically (O_EXCL) and removed on exit. A lock whose process is gone (kill -9, a crashed machine) is
        reported and taken over; on another host it cannot be checked, so it is refused. The temporary files of a
        killed save are removed once the lock is held. A folder made here and left empty is removed again."""
        if not enabled:
            yield
            return
        made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                self.take_stale()
        else:
            raise FileExistsError(f"{self.path} is in use: could not take {self.lock_file}")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            for tmp in remove_stale_temps(self.path):
                say(True, f"removed {tmp}, left by a save that was killed")
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)
            if made and not any(self.path.iterdir()):
                self.path.rmdir()

    def take_stale(self) -> None:
        """Remove run.lock if its process is dead; otherwise refuse, naming the process."""
        try:
            held = json.loads(self.lock_file.read_text(encoding="utf-8"))
            pid, host, since = int(held["pid"]), str(held["host"]), held.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):   # torn by a kill while it was written: nobody holds it
            pid, host, since = None, socket.gethostname(), "?"
        if host == socket.gethostname() and (pid is None or not running(pid)):
            say(True, f"{self.lock_file}: taking over the lock of process {pid}, which is no longer running")
            self.lock_file.unlink(missing_ok=True)
            return
        raise FileExistsError(f"{self.path} is in use by another run (pid {pid} on {host}, since {since}); wait for "
                              f"it or choose another --out (if that process is gone, delete {self.lock_file})")

    def check(self, resume: bool) -> None:
        """Refuse a folder that holds another run (without resume), and resume without a run."""
        if self.state_file.exists() and not resume:
            raise FileExistsError(f"{self.path} already holds a run's checkpoint ({self.state_file}); pass --resume to "
                                  f"continue it or choose another --out")
        if resume and not self.state_file.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.path} (expected {self.state_file})")

    def load_state(self, cfg) -> dict:
        """state.pt, read before the model loads: a file that is not a whole checkpoint is one line, and a setting
        that differs from the checkpoint's (any but RESUME_MAY_CHANGE) is refused, each difference named."""
        try:
            state = torch.load(self.state_file, map_location="cpu", weights_only=True)   # our own file; no pickles
        except Exception:   # empty, cut short, not torch's: torch raises several kinds, none naming the file
            state = None
        if not isinstance(state, dict) or not set(STATE_KEYS) <= state.keys():
            why = ("an empty file" if self.state_file.stat().st_size == 0 else "cut short, or not a torch file"
                   if state is None else "a torch file, but not a minicalm training checkpoint")
            raise ValueError(f"--resume: {self.state_file} cannot be read ({why}); start the run over in another "
                             f"--out, or delete this folder's state.pt to start over here") from None
        now, then = flatten(asdict(cfg)), flatten(state["config"])   # lora.r, ... with lists as tuples on both sides
        changed = [f"{flag_name(*k.rpartition('.')[::2])} {then.get(k)!r} now {v!r}" for k, v in now.items()
                   if k not in RESUME_MAY_CHANGE and then.get(k) != v]
        if changed:
            free = ", ".join(flag_name("", k) for k in RESUME_MAY_CHANGE[3:])
            raise ValueError(f"--resume: {self.state_file} was trained with other settings: {', '.join(changed)} "
                             f"(a resumed run may change only {free})")
        return state

    def check_data(self, state: dict, digest: str) -> None:
        """Refuse to resume on other training examples than the checkpoint's (a data file edited or swapped)."""
        if state.get("data", digest) != digest:
            raise ValueError(f"--resume: the training examples differ from those {self.state_file} was trained on "
                             f"(--train-file {state['config']['train_file']} then): resume on the same data, or start "
                             f"a new run in another --out")

    def start(self, cfg, task, step: int) -> None:
        """The settings and the task, and metrics.jsonl cut back to the checkpoint's step (those steps run again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "train_config.json", asdict(cfg))   # what is used now (a resume's new limits too)
        write_json(self.path / "task.json", task.to_dict())
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():   # a line torn by a crash is dropped too
            kept = [r for r in read_records(metrics) if isinstance(r.get("step"), int) and r["step"] <= step]
            write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_file, lambda p: torch.save(state, p))


def say(enabled: bool, *msg) -> None:
    """A message on stderr (the log of the run), when enabled."""
    if enabled:
        print(*msg, file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
