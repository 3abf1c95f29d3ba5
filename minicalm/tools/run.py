"""A training run's bookkeeping, outside the loop (train.py): the processes torchrun starts, the signals that stop a
run, the run folder (its settings, metrics.jsonl, state.pt) and resuming from it.
"""
from __future__ import annotations

import collections
import json
import os
import resource
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.files import atomic_write, read_records, write_json, write_text
from .cli import flatten


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
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch has no CUDA (torch {torch.__version__}); use cpu")
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

# Settings a resumed run must share with its checkpoint: they decide the data order, the adapter or the schedule's
# shape. Paths may change (a moved model or data file); so may the epochs / max_steps, to extend or cut a run.
RESUME_FIXED = ("task", "lr", "batch_size", "max_len", "lora", "loraplus_lr_ratio", "quantize", "warmup_steps",
                "schedule", "limit_train", "seed", "train_on_inputs", "full", "text")


class RunFolder:
    """A run's --out: train_config.json and task.json (what it was asked), metrics.jsonl (one line per step),
    state.pt (what resuming needs), adapter/ (or model/ for full training). Every file is written atomically but
    metrics.jsonl, which grows by a line per step (start() cuts a torn or rerun tail)."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.state_file = self.path / "state.pt"

    def check(self, resume: bool) -> None:
        """Refuse a folder that holds another run (without resume), and resume without a run."""
        if self.state_file.exists() and not resume:
            raise FileExistsError(f"{self.path} already holds a run's checkpoint ({self.state_file}); pass --resume to "
                                  f"continue it or choose another --out")
        if resume and not self.state_file.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.path} (expected {self.state_file})")

    def load_state(self, cfg) -> dict:
        """state.pt, refusing settings that would change the run (RESUME_FIXED)."""
        state = torch.load(self.state_file, map_location="cpu", weights_only=True)   # our own file; still no pickles
        now, then = flatten(asdict(cfg)), flatten(state["config"])   # lora.r, ... with lists as tuples on both sides
        changed = {k: (then.get(k), v) for k, v in now.items() if k.split(".")[0] in RESUME_FIXED and then.get(k) != v}
        if changed:
            raise ValueError(f"--resume: {self.state_file} was trained with other settings: " +
                             ", ".join(f"{k} {a!r} now {b!r}" for k, (a, b) in changed.items()))
        return state

    def start(self, cfg, task, step: int) -> None:
        """The settings and the task, and metrics.jsonl cut back to the checkpoint's step (those steps run again)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "train_config.json", asdict(cfg))
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
