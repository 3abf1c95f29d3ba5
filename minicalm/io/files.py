"""Files that are never half-written, and JSON read with errors that name the file. Imports nothing of minicalm.

Every file minicalm writes (checkpoints, adapters, tokenizers, task files, reports, pictures) goes through
`atomic_write`: the data goes to a temporary name beside the target, which is then renamed onto it, so a reader (or a
resumed run after a crash) sees the old file or the new one, never a torn one. The one exception is a run's
metrics.jsonl, which grows by a line per step: a reader skips a last line torn by a crash (read_records), and a
resumed run cuts the file back to its checkpoint's step. A process killed mid-write leaves its temporary file
(.NAME.tmpPID) behind: remove_stale_temps clears those of processes that are gone.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

LOW_SPACE = 64 * 2**20   # free bytes below which a failed write is taken for a full disk (torch.save does not say)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename tmp_path onto path; returns path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save on a full disk raises "RuntimeError: basic_ios::clear: iostream error": ask the disk (the temporary
        # file still holds what fitted)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else None
        if getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < LOW_SPACE):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise OSError(errno.ENOSPC, f"no space left on device in {path.parent}: writing {path.name} failed "
                                        f"({(free or 0) >> 20} MiB free); {kept} (free space, then rerun or "
                                        f"--resume)") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (.NAME.tmpPID) of atomic_writes whose process was killed, in folder and its immediate
    subfolders; a file whose process still runs is being written and is kept. Returns the files removed."""
    folder, removed = Path(folder), []
    for tmp in [*folder.glob(".*.tmp*"), *folder.glob("*/.*.tmp*")]:
        pid = re.fullmatch(r"\..+\.tmp(\d+)", tmp.name)
        if pid and tmp.is_file() and not running(int(pid[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def running(pid: int) -> bool:
    """Whether a process of this id exists (signal 0 checks without sending). On Windows os.kill would end it: there,
    every process counts as running."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically (reports and predictions hold Japanese, whatever the platform's default encoding)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """JSON as UTF-8 with non-ASCII text kept readable (ensure_ascii=False), atomically."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(number, text) of each line of a UTF-8 file, a leading BOM dropped. Bytes that are not UTF-8 raise a ValueError
    naming the file, line and column (Python's own error names only an offset in a buffer, not the file)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8")) + 1
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); save "
                                 f"the file as UTF-8") from None
            yield n, line


def read_records(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl); a line that is not one (the last line, torn by a crash
    or still being written) is skipped."""
    records = []
    for _, line in text_lines(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_json(path: str | os.PathLike, what: str = "a JSON file") -> dict:
    """A JSON object from a file; a missing file or bad JSON is one error that names the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what} expected)")
    try:
        obj = json.loads("".join(line for _, line in text_lines(path)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(obj).__name__}")
    return obj
