"""Data: reading a task's rows, downloading built-in tasks' data, encoding prompts for training and evaluation,
batching.

Training and evaluation both tokenize through `PromptEncoder`, segment by segment (the template's literal texts
and the row's fields, then the answer word and EOS), so the prefix shared by every prompt has the same ids in every
row, and a prompt is tokenized identically whether it is trained on or evaluated.
"""
from __future__ import annotations

import functools
import json
import posixpath
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..io import hub
from ..io.files import text_lines, write_text
from ..loss import IGNORE_INDEX, common_prefix, targets
from .task import MARC_JA, Task


@dataclass
class Row:
    fields: dict[str, str]   # the values of the task's prompt fields
    label: str               # the label's name; free-form: the answer trained on (the first reference); multiple
                             # choice: the right choice's text
    id: str
    references: tuple[str, ...] = ()   # free-form: every acceptable answer (scored: the best of them)
    choices: tuple[str, ...] = ()      # multiple choice: the row's choices, in index order
    gold: int | None = None            # multiple choice: the right choice's index

    @property
    def text(self) -> str:
        """The row's own text (its fields, one per line): raw text for pretraining and tokenizer training."""
        return "\n".join(v for v in self.fields.values() if v)


def parse_row(row, task: Task, line: int) -> Row:
    """One JSON row -> Row (through the task's column map); a ValueError names the field or label that is wrong. A
    field only the full template has (Alpaca's input) may be missing: it is empty."""
    answer = task.answer_field or task.label_field
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with fields {', '.join(map(task.key, task.fields + [answer]))}")
    choices = task.choices(row) if task.multiple_choice else []
    if task.choices_field is not None:   # the list's items are the prompt's {choice0}, {choice1}, ...
        row = row | {f"choice{i}": c for i, c in enumerate(choices)}
    fields = {}
    for name in task.fields:
        key, value = task.key(name), row.get(task.key(name), "" if name in task.optional else None)
        if value is None:
            raise ValueError(f"no field {key!r}, which task {task.name}'s prompt uses")
        if not isinstance(value, str):
            raise ValueError(f"{key} is {type(value).__name__}, not a string")
        fields[name] = value
    if task.key(answer) not in row:
        raise ValueError(f"no {'answer' if task.free_form else 'label'} field {task.key(answer)!r}")
    key = task.id_field
    row_id = str(row[key]) if key and row.get(key) is not None else str(line)
    if task.free_form:
        refs = task.references(row[task.key(answer)])
        return Row(fields, refs[0], row_id, tuple(refs))
    if task.multiple_choice:
        gold = task.choice_index(row[task.key(answer)], len(choices))
        return Row(fields, choices[gold], row_id, choices=tuple(choices), gold=gold)
    return Row(fields, task.label_name(row[task.label_field]), row_id)


def asked_row(task: Task, fields: dict[str, str]) -> Row:
    """A question a user asks (generate's text, /v1/answers' body), not a file's row: no answer; a multiple-choice
    question's choices are the prompt's own choice fields (`{choice0}`, ... for a task whose rows list them)."""
    if not task.multiple_choice:
        return Row(fields, "", "0")
    named = task.choice_fields or [f"choice{k}" for k in range(len(task.fields)) if f"choice{k}" in task.fields]
    if not (named and set(named) <= set(task.fields)):   # they must come with the question
        raise ValueError(f"task {task.name}'s choices are not all in its prompt, so a question cannot give them: "
                         f"its fields are {', '.join(task.fields)}")
    empty = [f for f in named if not fields[f].strip()]
    if empty:
        raise ValueError(f"{empty[0]} is empty: a question of task {task.name} gives a text for each of its choices "
                         f"({', '.join(named)})")
    return Row(fields, "", "0", choices=tuple(fields[f] for f in named))


def parse_rows(items: list, task: Task, where: str, limit: int | None = None) -> list[Row]:
    """Rows given as a list (a JSON array file, an llm-jp-eval file's samples or few_shots); an error names `where`
    and the element: `train.json[3]: no field 'instruction'...`."""
    out = []
    for n, item in enumerate(items[:limit]):
        try:
            out.append(parse_row(item, task, n))
        except ValueError as e:
            raise ValueError(f"{where}[{n}]: {e}") from None
    return out


def read_jsonl(path: str | Path, task: Task = MARC_JA, limit: int | None = None) -> list[Row]:
    """Rows of a JSON-lines file (the task's fields and label or answer, optionally an id); blank lines are skipped.
    A file holding one JSON array of rows (Stanford Alpaca's layout) is read too; its errors name the row's index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (JSON lines of task {task.name} rows expected)")
    rows: list[Row] = []
    lines = text_lines(path)
    for n, line in lines:
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        if not rows and line.lstrip().startswith("["):   # the first row: a JSON array's opening bracket
            return json_array_rows(path, line + "".join(rest for _, rest in lines), task, limit)
        try:
            rows.append(parse_row(json.loads(line), task, n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not rows and limit != 0:
        raise ValueError(f"{path}: no rows in the file")
    return rows


def json_array_rows(path: Path, text: str, task: Task, limit: int | None) -> list[Row]:
    """The rows of a file that holds one JSON array (ids default to the index); errors name the element."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}; a file that begins with [ is read as one JSON array)") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: an empty JSON array, or not an array of rows")
    return parse_rows(items, task, str(path), limit)


def parquet_to_jsonl(parquet: str | Path | list[Path], out_path: str | Path, task: Task = MARC_JA) -> dict[str, int]:
    """Convert a task's Parquet file, or a split's shards in order (JGLUE's: int labels; JSQuAD's answers a struct of
    lists), to one JSON-lines file, atomically; returns row counts (per label for a label task). Missing columns are
    named beside those found."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError('reading JGLUE\'s Parquet files needs pyarrow: pip install "minicalm[marc]"') from None
    answer = task.answer_field or task.label_field
    choices = [task.key(f) for f in task.choice_fields or []] + ([task.key(task.choices_field)] if
                                                                  task.choices_field else [])
    own = [task.key(f) for f in task.fields if task.choices_field is None or not f.startswith("choice")]
    columns = list(dict.fromkeys(own + choices + [task.key(answer)] + ([task.id_field] if task.id_field else [])))
    lines, counts = [], {"rows": 0} | {label: 0 for label in task.labels or {}}
    for path in parquet if isinstance(parquet, list) else [parquet]:
        try:
            found = pq.ParquetFile(path).schema_arrow.names
            missing = [c for c in columns if c not in found]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(missing)} for task {task.name}; the file has "
                                 f"{', '.join(found)}")
            rows = pq.read_table(path, columns=columns).to_pylist()
        except ValueError:
            raise
        except Exception as e:   # pyarrow's errors (not Parquet, damaged) share no useful base class
            raise ValueError(f"{path}: not a Parquet file of task {task.name} ({e})") from None
        for n, row in enumerate(rows):
            try:
                r = parse_row(row, task, n)
            except ValueError as e:
                raise ValueError(f"{path}: row {n}: {e}") from None
            counts["rows"] += 1
            if task.labels:
                counts[r.label] += 1
            out = ({k: row[k] for k in own + choices} |
                   {task.key(answer): list(r.references) if task.free_form else r.gold if task.multiple_choice else
                    r.label} | ({task.id_field: r.id} if task.id_field else {}))
            lines.append(json.dumps(out, ensure_ascii=False))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join(lines) + "\n")
    return counts


def split_layout(paths: list[str], file: str, split: str, where: str) -> list[str]:
    """A split's Parquet files among a dataset revision's `paths`, in either layout the hub's conversion has used:
    the task's configured file (JGLUE's TASKDIR/jglue-{split}.parquet) or TASKDIR/{split}/*.parquet (a later listing:
    shards, taken in name order, beside an index.duckdb). Neither: a HubError naming `where` and what TASKDIR holds."""
    folder = posixpath.dirname(file)
    inside = f"{folder}/" if folder else ""
    if file in paths:
        return [file]
    shards = [p for p in paths if posixpath.dirname(p) == inside + split and p.endswith(".parquet")]
    if shards:
        return sorted(shards)
    found, held = [p.removeprefix(inside) for p in paths if p.startswith(inside)], f"{inside or 'the top level'} holds"
    if not found and inside:   # no such folder: what the top level holds instead
        found = sorted({p.split("/")[0] + "/" * ("/" in p) for p in paths})
        held = f"there is no folder {inside}; the top level holds"
    more = f", ... ({len(found)} in all)" if len(found) > 8 else ""
    raise hub.HubError(f"{where} has neither {file} nor {inside}{split}/*.parquet: {held} "
                       f"{', '.join(found[:8]) + more or 'nothing'}")


def hub_split_files(task: Task, split: str, offline_hint: str = "") -> list[Path]:
    """A split's Parquet files from the hub, downloaded: the dataset's tree at task.hub's revision, the split's files
    in it (split_layout). When the hub cannot be asked (HF_HUB_OFFLINE, no connection), the configured file if the hub
    cache holds it, else the hub module's one-line error ending with `offline_hint`."""
    repo, revision, file = task.hub["repo"], task.hub.get("revision"), task.hub["files"][split]
    paths = hub.files(repo, revision, "dataset")
    names = [file] if paths is None else split_layout(paths, file, split, hub.describe(repo, revision, "dataset"))
    return [hub.download(repo, name, revision, "dataset", offline_hint=offline_hint) for name in names]


def task_data(task: Task, split: str, cache_dir: str | Path | None = None, subset: int | None = None,
              seed: int = 0, instead: str = "--train-file and --valid-file") -> Path:
    """A task's train or validation split as JSON lines, downloaded from the hub (task.hub, either layout:
    hub_split_files) and converted on first use (cached in ~/.cache/minicalm/<task>/, so later runs ask the hub
    nothing); `subset` keeps a fixed-seed random sample of that many rows.
    `instead` names what the user can pass rather than the hub's data (the flags of the script that asks)."""
    split = {"valid": "validation"}.get(split, split)
    if split not in ("train", "validation"):
        raise ValueError(f"{task.name} split {split!r}: expected 'train' or 'validation' (test labels are not "
                         f"public)")
    rows = f"JSON lines with {', '.join(map(task.key, task.fields + [task.answer_field or task.label_field]))}"
    if task.hub is None or split not in task.hub["files"]:
        raise FileNotFoundError(f"task {task.name} names no {split} data on the hub: pass {instead} ({rows})")
    folder = Path(cache_dir or Path("~/.cache/minicalm") / task.name).expanduser()
    full = folder / f"{split}.jsonl"
    if not full.is_file():
        counts = parquet_to_jsonl(hub_split_files(task, split, offline_hint=f"pass {instead} ({rows})"), full, task)
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
    the row's fields [+ enc(answer) + eos]. A task with Alpaca's pair of templates takes the short one for rows whose
    extra fields are empty; the shared prefix is then what both templates begin with.

    Only the fields are ever truncated (those the task lets be cut; their ends, the longest first), to leave room for
    the answer + eos within max_len: the longest label word, so the cut does not depend on the label and training
    and evaluation see the same prompt. A free-form training example makes room for its own answer, and a row whose
    uncut parts and answer do not fit is dropped; a free-form prompt to answer fills max_len alone (the answer comes
    on top), and one that cannot be cut to fit is kept whole. Refuses answer words whose tokens are a prefix of
    another's: greedy answers could not tell them apart.
    """

    def __init__(self, tokenizer, max_len: int = 256, task: Task = MARC_JA):
        self.tokenizer, self.max_len, self.task = tokenizer, max_len, task
        self.eos_id = tokenizer.eos_token_id
        self.templates = [self.template(segs) for segs in (task.segments, task.short_segments) if segs is not None]
        self.literal_ids = self.templates[0][0]
        firsts = [lits[0] for lits, _ in self.templates]
        self.prefix_ids = firsts[0][:common_prefix(firsts)]   # the shared prefix: the same in every prompt
        self.answer_ids = {label: tokenizer.encode(word) for label, word in (task.labels or {}).items()}   # no eos
        for a, ids_a in self.answer_ids.items():
            for b, ids_b in self.answer_ids.items():
                if a != b and ids_b[:len(ids_a)] == ids_a:
                    raise ValueError(f"{task.source}: task {task.name!r}: the answer word of {a!r} "
                                     f"({task.labels[a]!r}) is, in tokens, a prefix of that of {b!r} "
                                     f"({task.labels[b]!r}): an answer could not tell them apart")
        # room left after the prompt: the longest label word and eos; a free-form prompt alone fills max_len (its
        # answer comes on top in evaluation; in training, the row's own answer is made room for); a multiple-choice
        # row leaves room for its own longest choice and eos (row_reserve), in training and evaluation alike
        self.reserve = max(map(len, self.answer_ids.values())) + 1 if task.labels else 0
        fixed = max(sum(map(len, lits)) for lits, _ in self.templates) + self.reserve
        self.field_budget = max_len - fixed   # the most field tokens that fit
        if self.field_budget < (len(task.fields) if task.labels else 1):
            raise ValueError(f"max_len {max_len} leaves no room for the rows' text: the prompt's fixed text and the "
                             f"{'longest answer + eos' if task.labels else 'answer'} take {fixed} tokens with "
                             f"this tokenizer")

    def template(self, segments) -> tuple[list[list[int]], list[int]]:
        """A template's literal texts as ids, and the indexes (in task.fields) of the fields between them."""
        return ([self.tokenizer.encode(text) for text, _ in segments],
                [self.task.fields.index(name) for _, name in segments if name is not None])

    def prompt_from_ids(self, field_ids: list[list[int]], short: bool = False,
                        reserve: int | None = None) -> tuple[list[int], bool]:
        """The prompt's ids from each field's ids (in task.fields' order) in the full template (or the short one),
        and whether a field was cut to leave `reserve` tokens (default: self.reserve) within max_len."""
        lits, idx = self.templates[short]
        parts, cuttable = [field_ids[i] for i in idx], self.task.cut or self.task.fields
        can = [j for j, i in enumerate(idx) if self.task.fields[i] in cuttable]
        budget = self.max_len - sum(map(len, lits)) - (self.reserve if reserve is None else reserve)
        keep = [len(f) for f in parts]
        while sum(keep) > budget and any(keep[j] for j in can):   # cut the longest down to the next, or to fit
            i = max(can, key=keep.__getitem__)
            rest = max((keep[j] for j in can if j != i), default=0)
            keep[i] -= min(sum(keep) - budget, max(keep[i] - rest, 1))
        ids = []
        for lit, f, k in zip(lits, parts + [[]], keep + [0]):
            ids += lit + f[:k]
        return ids, keep != [len(f) for f in parts]

    def example_from_ids(self, field_ids: list[list[int]], label: str, train_on_inputs: bool = False,
                         short: bool = False, reserve: int | None = None) -> tuple[list[int], list[int], bool] | None:
        """(input_ids, labels, truncated), or None for a row whose own answer (free-form, or the right choice) cannot
        fit max_len; `reserve`: the room a multiple-choice row leaves (row_reserve)."""
        if not self.task.labels:
            answer = self.tokenizer.encode(label) + [self.eos_id]
            prompt, truncated = self.prompt_from_ids(field_ids, short, reserve=reserve or len(answer))
            if len(prompt) + len(answer) > self.max_len:
                return None
        else:
            if label not in self.answer_ids:
                raise ValueError(f"unknown label {label!r} (expected one of {sorted(self.answer_ids)})")
            prompt, truncated = self.prompt_from_ids(field_ids, short)
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
        return self.encode_prompts([row])[0]

    def encode_prompts(self, rows: list[Row]) -> list[tuple[list[int], bool]]:
        return [self.prompt_from_ids(f, self.task.short(r.fields), res) for r, f, res in
                zip(rows, self.field_ids(rows), self.row_reserves(rows))]

    def choice_ids(self, rows: list[Row]) -> list[list[list[int]]]:
        """Each multiple-choice row's choices tokenized (without eos), one batch for all of them."""
        flat = self.tokenizer.encode_batch([c for r in rows for c in r.choices])
        out, i = [], 0
        for r in rows:
            out.append(flat[i:i + len(r.choices)])
            i += len(r.choices)
        return out

    def row_reserves(self, rows: list[Row]) -> list[int | None]:
        """The room each row's prompt leaves within max_len: a multiple-choice row's longest choice and eos, so that
        training and evaluation cut its prompt alike; None (self.reserve) for the others."""
        if not self.task.multiple_choice:
            return [None] * len(rows)
        return [max(map(len, ids)) + 1 for ids in self.choice_ids(rows)]

    def encode_example(self, row: Row, train_on_inputs: bool = False) -> tuple[list[int], list[int], bool] | None:
        """(input_ids, labels, truncated). labels align with input_ids (the loss shifts them) and are -100
        except on the answer + eos; with train_on_inputs they equal input_ids (loss on the whole sequence)."""
        return self.example_from_ids(self.field_ids([row])[0], row.label, train_on_inputs, self.task.short(row.fields),
                                     self.row_reserves([row])[0])


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]      # aligned with input_ids; IGNORE_INDEX where nothing is scored

    @functools.cached_property
    def n_scored(self) -> int:
        """Tokens the loss scores (loss.targets: each label is predicted from the tokens before it)."""
        return int((targets(torch.tensor(self.labels)) != IGNORE_INDEX).sum())


def split_rows(task: Task, split: str, given: str | Path | None, instead: str) -> str | Path | list[Row]:
    """Where a split's rows come from: the file given; else the rows the task file holds (an llm-jp-eval file's
    samples, for training and evaluation alike); else the task's own split from the hub (task_data)."""
    if given:
        return given
    if task.samples is not None:
        return parse_rows(task.samples, task, f"{task.source}: samples")
    return task_data(task, split, instead=instead)


def rows_of(source: str | Path | list[Row], task: Task, limit: int | None = None) -> list[Row]:
    """The rows of a JSON-lines file, or of a list of rows (split_rows), the first `limit` of them."""
    return source[:limit] if isinstance(source, list) else read_jsonl(source, task, limit=limit)


def read_examples(source: str | Path | list[Row], task: Task, tokenizer, max_len: int, *, limit: int | None = None,
                  train_on_inputs: bool = False, text: bool = False) -> list[Example]:
    """A file's rows (or a list of rows) as training examples: prompts with their answers, or (text=True,
    pretraining) the rows' text packed into blocks of max_len. Says on stderr how many rows were cut to fit, and
    how many free-form rows were dropped (their uncut parts and answer alone exceed max_len)."""
    rows = rows_of(source, task, limit)
    if text:
        return [Example(b.tolist(), b.tolist()) for b in pack_texts(tokenizer, [r.text for r in rows], max_len)]
    examples, truncated = encode_rows(PromptEncoder(tokenizer, max_len, task), rows, train_on_inputs)
    dropped = len(rows) - len(examples)
    if truncated or dropped:
        where = f"{task.source} samples" if isinstance(source, list) else source
        print(f"{where}: {truncated} of {len(rows)} rows truncated to --max-len {max_len}" +
              (f", {dropped} dropped (the parts that are never cut and the answer exceed it)" if dropped else ""),
              file=sys.stderr)
    return examples


def run_data(cfg, task: Task, tokenizer) -> tuple[list[Example], list[Example], list[Row]]:
    """A training run's data (cfg: its TrainConfig): the training examples, the validation examples for the loss and
    the validation rows answered greedily for accuracy. Each split from the file given, the task file's own rows, or
    the task's own from the hub ("none": no validation)."""
    read = lambda source, limit: read_examples(source, task, tokenizer, cfg.max_len, limit=limit,   # noqa: E731
                                               train_on_inputs=cfg.train_on_inputs, text=cfg.text)
    train = read(split_rows(task, "train", cfg.train_file, "--train-file"), cfg.limit_train)
    if not train:
        raise ValueError("the training set is empty")
    valid = None if cfg.valid_file == "none" else split_rows(task, "validation", cfg.valid_file, "--valid-file")
    rows = rows_of(valid, task, cfg.eval_accuracy) if valid is not None and cfg.eval_accuracy else []
    return train, read(valid, cfg.eval_limit) if valid is not None else [], rows


def encode_rows(encoder: PromptEncoder, rows: list[Row],
                train_on_inputs: bool = False) -> tuple[list[Example], int]:
    """(examples, how many rows were truncated), tokenized in parallel batches; the free-form rows that cannot fit
    are left out (as many as len(rows) - len(examples))."""
    examples, n_truncated = [], 0
    for row, fids, reserve in zip(rows, encoder.field_ids(rows), encoder.row_reserves(rows)):
        made = encoder.example_from_ids(fids, row.label, train_on_inputs, encoder.task.short(row.fields), reserve)
        if made is not None:
            examples.append(Example(*made[:2]))
            n_truncated += made[2]
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


def loss_batches(examples: list[Example], micro_batch_size: int, pad_id: int,
                 device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) on `device` for micro-batches of similar lengths, always in the same order: what
    loss.validation_loss reads."""
    for idx in length_batches([len(e.input_ids) for e in examples], micro_batch_size, seed=0):
        x, y = collate([examples[i] for i in idx], pad_id)
        yield x.to(device), y.to(device)


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
