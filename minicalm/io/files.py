"""Files that are never half-written, and JSON read with errors that name the file. Imports nothing of minicalm.

Every file minicalm writes (checkpoints, adapters, tokenizers, task files, reports, pictures) goes through
`atomic_write`: the data goes to a temporary name beside the target, which is then renamed onto it, so a reader (or a
resumed run after a crash) sees the old file or the new one, never a torn one. The one exception is a run's
metrics.jsonl, which grows by a line per step: a reader skips a last line torn by a crash (read_records), and a
resumed run cuts the file back to its checkpoint's step. A process killed mid-write leaves its temporary file
(.NAME.tmpPID) behind: remove_stale_temps clears those of processes that are gone. A folder of several files (a merged
or converted checkpoint) is written whole by `atomic_folder`: into a temporary folder beside it, renamed into place
when complete. `check_writable` refuses, before any work is done, an output folder that cannot be made or written.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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
        if disk_full(path.parent, e):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise OSError(errno.ENOSPC, f"no space left on device in {path.parent}: writing {path.name} failed "
                                        f"({free_mib(path.parent)} MiB free); {kept}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def disk_full(folder: Path, e: BaseException) -> bool:
    """Whether a failed write was a full disk: ENOSPC, or little space left (torch.save does not say)."""
    free = shutil.disk_usage(folder).free if folder.is_dir() else None
    return getattr(e, "errno", None) == errno.ENOSPC or (free is not None and free < LOW_SPACE)


def free_mib(folder: Path) -> int:
    return shutil.disk_usage(folder).free >> 20 if folder.is_dir() else 0


def append_line(path: str | os.PathLike, line: str) -> None:
    """One line at the end of a file (metrics.jsonl), as one write; a failure names the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        why = (f"no space left on device ({free_mib(Path(path).parent)} MiB free)" if disk_full(Path(path).parent, e)
               else e.strerror or str(e))
        raise OSError(e.errno, f"appending to {path} failed: {why}") from None


def check_writable(folder: str | os.PathLike, what: str, keep: bool = False) -> Path:
    """Refuse, before any work is done, an output folder that cannot be made or written (a file of that name, a
    read-only place): after an hour of evaluation the results would be lost. The folders the probe made are removed
    again (unless `keep`), so a command refused later leaves nothing behind. `what` names it in the error (the
    flag)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder}: a file is there, not a folder; choose another {what}")
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    probe = folder / f".write-test.tmp{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise OSError(e.errno, f"{what} {folder}: cannot write there ({e.strerror}); choose another {what}") from None
    finally:
        probe.unlink(missing_ok=True)
        for p in [] if keep else made:   # the deepest first; one another process has begun to use stays
            try:
                p.rmdir()
            except OSError:
                break
    return folder


@contextmanager
def atomic_folder(out: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Write a folder whole: the block writes into a temporary folder beside `out` (.NAME.tmpPID), which is renamed
    onto `out` when the block ends; on any error it is removed, and `out` is as it was. `out` may exist empty; one
    with files is replaced only with replace=True (the old one is removed once the new one is in place)."""
    out = Path(out)
    for stale in out.parent.glob(f".{out.name}.tmp*") if out.parent.is_dir() else ():   # killed earlier writes
        pid = re.fullmatch(rf"\.{re.escape(out.name)}\.tmp(\d+)", stale.name)
        if pid and stale.is_dir() and not running(int(pid[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()):
            if not replace:
                raise FileExistsError(f"{out} holds files; not replaced")
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)   # onto an empty folder, or none
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:   # atomic_write's, or the rename's
            raise OSError(errno.ENOSPC, f"no space left on device writing {out} ({free_mib(out.parent)} MiB free): "
                                        f"nothing of it was written (free space, then run it again)") from None
        raise


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


def read_records(path: str | os.PathLike, damaged: list[int] | None = None) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl). The last line may be torn by a crash or still being
    written: skipped. Another line that is not a JSON object (a damaged file) is skipped too, and its number appended
    to `damaged` when given, so that a reader can say how many it dropped."""
    records, bad, last = [], [], 0
    for n, line in text_lines(path):
        last = n
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif line.strip():
            bad.append(n)
    if damaged is not None:
        damaged += [n for n in bad if n != last]
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
