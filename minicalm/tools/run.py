"""A training run's bookkeeping, outside the loop (train.py): the processes torchrun starts, the signals that stop a
run, the run folder (its settings, metrics.jsonl, state.pt) and resuming from it.
"""
from __future__ import annotations

import collections
import errno
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

try:
    import fcntl
except ImportError:   # Windows has no flock: a run there does not lock its folder
    fcntl = None

from ..io.weights import fingerprint
from ..io.files import append_line, atomic_write, check_writable, read_records, remove_stale_temps, write_json, write_text
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
        """One run at a time in this folder. run.lock is held with an exclusive flock while the run works here: the
        kernel decides who holds it, atomically, and lets go when the process ends however it ends (kill -9
        included), so there is no stale-lock guessing and no race between runs starting together. The file names
        the holder (pid, host, start) for the message a second run gets; a lock left by a process that is gone is
        taken over, saying so. One whose file names another host is refused: a disk shared between machines may not
        carry the lock across them. The temporary files of a killed save are removed once the lock is held. A folder
        made here and left empty is removed again."""
        if not enabled:
            yield
            return
        made = not self.path.exists()
        check_writable(self.path, "--out", keep=True)   # made here, removed on exit if the run leaves it empty
        fd = self.take_lock()
        try:
            for tmp in remove_stale_temps(self.path):
                say(True, f"removed {tmp}, left by a save that was killed")
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)   # still held: a run that opened the old file retries (take_lock)
            os.close(fd)
            if made and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()

    def take_lock(self) -> int:
        """The locked run.lock's descriptor, with this process written into it; refuses a folder in use."""
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = self.holder(fd)
                os.close(fd)
                raise FileExistsError(f"{self.path} is in use by another run ({held}); wait for it or choose another "
                                      f"--out") from None
            try:   # the holder may have removed the file between our open and flock: lock the one that is there now
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        before = self.holder(fd, parsed=True)
        if before is not None and before["host"] != socket.gethostname():
            os.close(fd)
            raise FileExistsError(f"{self.path} is in use by another run ({self.holder_text(before)}), on another "
                                  f"machine, which cannot be checked from here; wait for it or choose another --out "
                                  f"(if that run is gone, delete {self.lock_file})")
        if before is not None:
            say(True, f"{self.lock_file}: taking over the lock of process {before['pid']}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd

    @staticmethod
    def holder(fd: int, parsed: bool = False):
        """Who run.lock names: {"pid", "host", "started"} (parsed) or a phrase for messages; an empty or torn file
        (a run killed as it started, or one writing it right now) is None or says so."""
        try:
            held = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            held = {"pid": int(held["pid"]), "host": str(held["host"]), "started": held.get("started", "?")}
        except (OSError, ValueError, KeyError, TypeError):
            held = None
        if parsed:
            return held
        return "a run that is just starting" if held is None else RunFolder.holder_text(held)

    @staticmethod
    def holder_text(held: dict) -> str:
        return f"pid {held['pid']} on {held['host']}, since {held['started']}"

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
        if now["model"] == then["model"] and Path(now["model"]).is_absolute() and not Path(now["model"]).exists():
            raise ValueError(f"--resume: the base model {now['model']} that {self.state_file} was trained on is not "
                             f"there any more; if it moved, pass --model with its new folder (the same weights are "
                             f"recognised by their fingerprint)")
        if now["model"] != then["model"] and self.base_moved(state, now["model"]):
            say(True, f"--resume: the base moved from {then['model']} to {now['model']} (the same weights)")
            then["model"] = now["model"]
        changed = [f"{flag_name(*k.rpartition('.')[::2])} {then.get(k)!r} now {v!r}" for k, v in now.items()
                   if k not in RESUME_MAY_CHANGE and then.get(k) != v]
        if changed:
            free = ", ".join(flag_name("", k) for k in RESUME_MAY_CHANGE[3:])
            raise ValueError(f"--resume: {self.state_file} was trained with other settings: {', '.join(changed)} "
                             f"(a resumed run may change only {free})")
        return state

    @staticmethod
    def base_moved(state: dict, model: str) -> bool:
        """Whether the folder `model` holds the checkpoint's base (the same weights' fingerprint, io.weights)."""
        return bool(state.get("base")) and Path(model).is_dir() and fingerprint(model) == state["base"]

    def check_data(self, state: dict, digest: str) -> None:
        """Refuse to resume on other training examples than the checkpoint's (a data file edited or swapped)."""
        if state.get("data", digest) != digest:
            raise ValueError(f"--resume: the training examples differ from those {self.state_file} was trained on "
                             f"(--train-file {state['config']['train_file']} then): resume on the same data, or start "
                             f"a new run in another --out")

    def start(self, cfg, task, step: int) -> None:
        """The settings and the task, and metrics.jsonl cut back to the checkpoint's step (those steps run again).
        train_config.json holds what to rerun (a resume's new limits too), not how the run was started: no resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "train_config.json", {k: v for k, v in asdict(cfg).items() if k != "resume"})
        write_json(self.path / "task.json", task.to_dict())
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():   # a line torn by a crash is dropped too
            kept = [r for r in read_records(metrics) if isinstance(r.get("step"), int) and r["step"] <= step]
            write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        append_line(self.path / "metrics.jsonl", json.dumps(record))

    def kept(self) -> str:
        """Where the last good checkpoint is, if one was written (for the message of a run that stops)."""
        return f"; the last good checkpoint is kept in {self.path}" if self.state_file.exists() else \
            "; no checkpoint was written yet"

    @contextmanager
    def full_disk(self):
        """A full disk while the run saves or logs: the error says what is kept, and that --resume goes on."""
        try:
            yield
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            resume = "; once there is room, --resume continues from it" if self.state_file.exists() else ""
            raise OSError(e.errno, f"{e.strerror}{self.kept()}{resume}") from None

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_file, lambda p: torch.save(state, p))


def say(enabled: bool, *msg) -> None:
    """A message on stderr (the log of the run), when enabled."""
    if enabled:
        print(*msg, file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
