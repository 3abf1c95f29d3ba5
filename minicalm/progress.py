"""A one-line progress bar for long work (training steps, evaluated reviews), on stderr."""
from __future__ import annotations

import sys
import time


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", start: int = 0, enabled: bool = True, every: float | None = None):
        self.total, self.desc, self.n, self.enabled = total, desc, start, enabled
        self.start_n, self.t0, self.last = start, time.time(), 0.0
        self.tty = sys.stderr.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 10.0)

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        now = time.time()
        if not self.enabled or (now - self.last < self.every and self.n < self.total):
            return
        self.last = now
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        info = " ".join(f"{k} {v}" for k, v in fields.items())
        line = f"{self.desc} {self.n}/{self.total} [{fmt_time(now - self.t0)}<{fmt_time(eta)}, {rate:.2f}/s] {info}"
        # On a terminal redraw one line; in a log file print a line each `every` seconds, not a flood of \r.
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)
