"""Files that are never half-written, and JSON read with errors that name the file. Imports nothing of minicalm.

Every file minicalm writes (checkpoints, adapters, tokenizers, task files, reports, pictures) goes through
`atomic_write`: the data goes to a temporary name beside the target, which is then renamed onto it, so a reader (or a
resumed run after a crash) sees the old file or the new one, never a torn one. The one exception is a run's
metrics.jsonl, which grows by a line per step: a reader skips a last line torn by a crash (read_records), and a
resumed run cuts the file back to its checkpoint's step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename tmp_path onto path; returns path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically (reports and predictions hold Japanese, whatever the platform's default encoding)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """JSON as UTF-8 with non-ASCII text kept readable (ensure_ascii=False), atomically."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file (metrics.jsonl); a line that is not one (the last line, torn by a crash
    or still being written) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
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
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(obj).__name__}")
    return obj
