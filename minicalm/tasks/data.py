"""Data: reading a task's rows, downloading built-in tasks' data, encoding prompts for training and evaluation,
batching.

Training and evaluation both tokenize through `PromptEncoder`, segment by segment (the template's literal texts
and the row's fields, then the answer word and EOS), so the prefix shared by every prompt has the same ids in every
row, and a prompt is tokenized identically whether it is trained on or evaluated.
"""
from __future__ import annotations

import json
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import hub
from ..io.files import text_lines, write_text
from ..loss import IGNORE_INDEX
from .task import MARC_JA, Task


@dataclass
class Row:
    fields: dict[str, str]   # the values of the task's prompt fields
    label: str               # the label's name
    id: str

    @property
    def text(self) -> str:
        """The row's own text (its fields, one per line): raw text for pretraining and tokenizer training."""
        return "\n".join(self.fields.values())


def parse_row(row, task: Task, line: int) -> Row:
    """One JSON row -> Row; a ValueError names the field or label that is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with fields {', '.join(task.fields + [task.label_field])}")
    for name in task.fields:
        if name not in row:
            raise ValueError(f"no field {name!r}, which task {task.name}'s prompt uses")
        if not isinstance(row[name], str):
            raise ValueError(f"{name} is {type(row[name]).__name__}, not a string")
    if task.label_field not in row:
        raise ValueError(f"no label field {task.label_field!r}")
    key = task.id_field
    return Row({name: row[name] for name in task.fields}, task.label_name(row[task.label_field]),
               str(row[key]) if key and row.get(key) is not None else str(line))


def read_jsonl(path: str | Path, task: Task = MARC_JA, limit: int | None = None) -> list[Row]:
    """Rows of a JSON-lines file (the task's fields and label, optionally an id); blank lines are skipped. A JSON
    array (the other common layout) is refused with the command that converts it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (JSON lines of task {task.name} rows expected)")
    rows: list[Row] = []
    for n, line in text_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        if not rows and line.lstrip().startswith("["):   # the first row: a JSON array's opening bracket
            out = path.with_suffix(".jsonl") if path.suffix != ".jsonl" else path.with_suffix(".lines.jsonl")
            raise ValueError(f"{path}: a JSON array; minicalm reads JSON lines (one object per line): convert it with "
                             f"python -X utf8 -c \"import json, sys; [print(json.dumps(r, ensure_ascii=False)) for r in "
                             f"json.load(open(sys.argv[1], encoding='utf-8-sig'))]\" {path} > {out}")
        try:
            rows.append(parse_row(json.loads(line), task, n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not rows and limit != 0:
        raise ValueError(f"{path}: no rows in the file")
    return rows


def parquet_to_jsonl(parquet_path: str | Path, out_path: str | Path, task: Task = MARC_JA) -> dict[str, int]:
    """Convert a task's Parquet file (JGLUE's: int labels) to JSON lines, atomically; returns row counts per label."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError('reading JGLUE\'s Parquet files needs pyarrow: pip install "minicalm[marc]"') from None
    columns = task.fields + [task.label_field] + ([task.id_field] if task.id_field else [])
    try:
        rows = pq.read_table(parquet_path, columns=columns).to_pylist()
    except Exception as e:   # pyarrow's errors (missing column, not Parquet) share no useful base class
        raise ValueError(f"{parquet_path}: not a Parquet file of task {task.name} ({e})") from None
    lines, counts = [], {"rows": 0} | {label: 0 for label in task.labels}
    for n, row in enumerate(rows):
        try:
            r = parse_row(row, task, n)
        except ValueError as e:
            raise ValueError(f"{parquet_path}: row {n}: {e}") from None
        counts["rows"] += 1
        counts[r.label] += 1
        out = r.fields | {task.label_field: r.label} | ({task.id_field: r.id} if task.id_field else {})
        lines.append(json.dumps(out, ensure_ascii=False))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join(lines) + "\n")
    return counts


def task_data(task: Task, split: str, cache_dir: str | Path | None = None, subset: int | None = None,
              seed: int = 0, instead: str = "--train-file and --valid-file") -> Path:
    """A task's train or validation split as JSON lines, downloaded from the hub (task.hub) and converted on first
    use (cached in ~/.cache/minicalm/<task>/); `subset` keeps a fixed-seed random sample of that many rows.
    `instead` names what the user can pass rather than the hub's data (the flags of the script that asks)."""
    split = {"valid": "validation"}.get(split, split)
    if split not in ("train", "validation"):
        raise ValueError(f"{task.name} split {split!r}: expected 'train' or 'validation' (test labels are not "
                         f"public)")
    rows = f"JSON lines with {', '.join(task.fields + [task.label_field])}"
    if task.hub is None or split not in task.hub["files"]:
        raise FileNotFoundError(f"task {task.name} names no {split} data on the hub: pass {instead} ({rows})")
    folder = Path(cache_dir or Path("~/.cache/minicalm") / task.name).expanduser()
    full = folder / f"{split}.jsonl"
    if not full.is_file():
        parquet = hub.download(task.hub["repo"], task.hub["files"][split], task.hub.get("revision"), "dataset",
                               offline_hint=f"pass {instead} ({rows})")
        counts = parquet_to_jsonl(parquet, full, task)
        want = task.hub.get(f"{split}_counts")
        if want and {k: counts[k] for k in want} != want:
            warnings.warn(f"{full}: {task.name} {split} has {counts}, expected {want} (for MARC-ja, a 5,734-row "
                          f"validation file is the unofficial regeneration)")
    if subset is None:
        return full
    out = folder / f"{split}-{subset}-seed{seed}.jsonl"
    if not out.is_file():
        lines = [ln for ln in full.read_text(encoding="utf-8").splitlines() if ln.strip()]
        picked = sorted(random.Random(seed).sample(range(len(lines)), min(subset, len(lines))))
        write_text(out, "".join(lines[i] + "\n" for i in picked))
    return out


class PromptEncoder:
    """Token ids of a task's prompts and training examples, segment by segment: the template's literal texts and
    the row's fields [+ enc(answer word) + eos].

    Only the fields are ever truncated (their ends are cut, the longest first), to leave room for the longest
    answer + eos within max_len; the cut does not depend on the label, so training and evaluation see the same
    prompt. Refuses answer words whose tokens are a prefix of another's: greedy answers could not tell them apart.
    """

    def __init__(self, tokenizer, max_len: int = 256, task: Task = MARC_JA):
        self.tokenizer, self.max_len, self.task = tokenizer, max_len, task
        self.eos_id = tokenizer.eos_token_id
        self.literal_ids = [tokenizer.encode(text) for text, _ in task.segments]
        self.prefix_ids = self.literal_ids[0]   # the shared prefix: the same in every prompt
        self.answer_ids = {label: tokenizer.encode(word) for label, word in task.labels.items()}   # without eos
        for a, ids_a in self.answer_ids.items():
            for b, ids_b in self.answer_ids.items():
                if a != b and ids_b[:len(ids_a)] == ids_a:
                    raise ValueError(f"{task.source}: task {task.name!r}: the answer word of {a!r} "
                                     f"({task.labels[a]!r}) is, in tokens, a prefix of that of {b!r} "
                                     f"({task.labels[b]!r}): an answer could not tell them apart")
        fixed = sum(map(len, self.literal_ids)) + max(map(len, self.answer_ids.values())) + 1
        self.field_budget = max_len - fixed   # the most field tokens that fit
        if self.field_budget < len(task.fields):
            raise ValueError(f"max_len {max_len} leaves no room for the rows' text: the prompt's fixed text and the "
                             f"longest answer + eos take {fixed} tokens with this tokenizer")

    def prompt_from_ids(self, field_ids: list[list[int]]) -> tuple[list[int], bool]:
        """The prompt's ids from each field's ids (in the template's order), and whether a field was cut."""
        keep = [len(f) for f in field_ids]
        while sum(keep) > self.field_budget:   # cut the longest field down to the next longest, or to fit
            i = max(range(len(keep)), key=keep.__getitem__)
            rest = max((k for j, k in enumerate(keep) if j != i), default=0)
            keep[i] -= min(sum(keep) - self.field_budget, max(keep[i] - rest, 1))
        ids = []
        for lit, f, k in zip(self.literal_ids, field_ids + [[]], keep + [0]):
            ids += lit + f[:k]
        return ids, keep != [len(f) for f in field_ids]

    def example_from_ids(self, field_ids: list[list[int]], label: str,
                         train_on_inputs: bool = False) -> tuple[list[int], list[int], bool]:
        if label not in self.answer_ids:
            raise ValueError(f"unknown label {label!r} (expected one of {sorted(self.answer_ids)})")
        prompt, truncated = self.prompt_from_ids(field_ids)
        answer = self.answer_ids[label] + [self.eos_id]
        ids = prompt + answer
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + answer
        return ids, labels, truncated

    def field_ids(self, rows: list[Row]) -> list[list[list[int]]]:
        """Each row's fields tokenized, in the template's order; one parallel batch per field."""
        per_field = [self.tokenizer.encode_batch([r.fields[f] for r in rows]) for f in self.task.fields]
        return [list(ids) for ids in zip(*per_field)]

    def encode_prompt(self, row: Row) -> tuple[list[int], bool]:
        """(ids of the prompt, whether a field was cut)."""
        return self.prompt_from_ids(self.field_ids([row])[0])

    def encode_prompts(self, rows: list[Row]) -> list[tuple[list[int], bool]]:
        return [self.prompt_from_ids(f) for f in self.field_ids(rows)]

    def encode_example(self, row: Row, train_on_inputs: bool = False) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated). labels align with input_ids (the loss shifts them) and are -100
        except on the answer + eos; with train_on_inputs they equal input_ids (loss on the whole sequence)."""
        return self.example_from_ids(self.field_ids([row])[0], row.label, train_on_inputs)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]      # aligned with input_ids; IGNORE_INDEX where nothing is scored

    @property
    def n_scored(self) -> int:
        """Tokens the loss scores: the labels after the first (each is predicted from the ones before it)."""
        return sum(t != IGNORE_INDEX for t in self.labels[1:])


def read_examples(path: str | Path, task: Task, tokenizer, max_len: int, *, limit: int | None = None,
                  train_on_inputs: bool = False, text: bool = False) -> list[Example]:
    """A file's rows as training examples: prompts with their answers, or (text=True, pretraining) the rows' text
    packed into blocks of max_len. Says on stderr how many rows were cut to fit."""
    rows = read_jsonl(path, task, limit=limit)
    if text:
        return [Example(b.tolist(), b.tolist()) for b in pack_texts(tokenizer, [r.text for r in rows], max_len)]
    examples, truncated = encode_rows(PromptEncoder(tokenizer, max_len, task), rows, train_on_inputs)
    if truncated:
        print(f"{path}: {truncated} of {len(rows)} rows truncated to --max-len {max_len}", file=sys.stderr)
    return examples


def run_data(cfg, task: Task, tokenizer) -> tuple[list[Example], list[Example], list[Row]]:
    """A training run's data (cfg: its TrainConfig): the training examples, the validation examples for the loss and
    the validation rows answered greedily for accuracy. Each split from the file given, or the task's own from the
    hub ("none": no validation)."""
    split = lambda name, given, flag: given or task_data(task, name, instead=flag)   # noqa: E731
    read = lambda path, limit: read_examples(path, task, tokenizer, cfg.max_len, limit=limit,   # noqa: E731
                                             train_on_inputs=cfg.train_on_inputs, text=cfg.text)
    train = read(split("train", cfg.train_file, "--train-file"), cfg.limit_train)
    if not train:
        raise ValueError("the training set is empty")
    valid = None if cfg.valid_file == "none" else split("validation", cfg.valid_file, "--valid-file")
    rows = read_jsonl(valid, task, limit=cfg.eval_accuracy) if valid and cfg.eval_accuracy else []
    return train, read(valid, cfg.eval_limit) if valid else [], rows


def shared_prefix_tokens(examples: list[Example]) -> int:
    """How many tokens every example begins with (the prompt's shared prefix): what the plan counts on."""
    first = examples[0].input_ids
    n = len(first)
    for e in examples[1:]:
        while e.input_ids[:n] != first[:n]:
            n -= 1
    return n


def encode_rows(encoder: PromptEncoder, rows: list[Row],
                train_on_inputs: bool = False) -> tuple[list[Example], int]:
    """(examples, how many rows were truncated), tokenized in parallel batches."""
    examples, n_truncated = [], 0
    for row, fids in zip(rows, encoder.field_ids(rows)):
        ids, labels, truncated = encoder.example_from_ids(fids, row.label, train_on_inputs)
        examples.append(Example(ids, labels))
        n_truncated += truncated
    return examples, n_truncated


def length_batches(lengths: list[int], batch_size: int, seed: int, window: int = 64) -> list[list[int]]:
    """Micro-batches of indices that group similar lengths (little padding) yet stay random.

    Shuffle, sort within windows of window * batch_size, cut into batches, shuffle the batch order; the same
    seed gives the same batches. Every index appears once; the last batch may be smaller.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = window * batch_size
    batches = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s:s + span], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (B, T) and labels (B, T), labels -100 at padding.

    Right padding needs no attention mask: causal attention never lets a real token see the padding after it.
    """
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    return input_ids, labels


def pack_texts(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Raw-text mode for pretraining: texts + eos each, concatenated, cut into full blocks (B, block_size)."""
    ids = [t for row in tokenizer.encode_batch(texts) for t in row + [tokenizer.eos_token_id]]
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"{len(texts)} texts give {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
