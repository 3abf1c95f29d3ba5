"""A task: the prompt a model answers and the word it answers with, for any text classification.

As a JSON file (`--task FILE`), or built in by name (`--task marc-ja`, the default, or `jnli`):

    {"name": "amazon-ja-3",
     "prompt": "...### Input:\\n{text}\\n\\n### Response:\\n",
     "labels": {"positive": "ポジティブ", "neutral": "ニュートラル", "negative": "ネガティブ"},
     "label_field": "label",
     "id_field": "id",
     "hub": {"repo": "owner/name", "revision": "main", "files": {"train": "train.parquet", "validation": ...}}}

Fields in braces name the keys of the data's JSON rows (`{sentence1}`, `{sentence2}` for pairs; `{{` and `}}` are
literal braces). The prompt ends where the answer begins: a training example is the prompt, the label's word,
then EOS. `labels` maps each label name to its answer word, in the order that integer labels in the data index.
`label_field` defaults to "label"; `id_field` is optional (a row without an id gets its line number); `hub`, also
optional, names a hub dataset's Parquet files holding the task's rows (the built-in tasks have one). The text
before the first field is the same in every prompt, the shared prefix: evaluation computes it once per run, training once
per micro-batch.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from ..io.files import read_json

KEYS = ("name", "prompt", "labels", "label_field", "id_field", "hub")
# JGLUE (github.com/yahoojapan/JGLUE) no longer ships MARC-ja's reviews; the hub holds JGLUE's tasks as Parquet on
# this ref of the dataset shunk031/JGLUE, the files its loading script (JGLUE.py) falls back to.
JGLUE = {"repo": "shunk031/JGLUE", "revision": "refs/convert/parquet"}


@dataclass
class Task:
    name: str
    prompt: str                    # the template, up to where the answer begins
    labels: dict[str, str]         # label name -> answer word, in the data's integer order
    label_field: str = "label"
    id_field: str | None = None
    hub: dict | None = None        # where the rows live on the hub: repo, revision, files[split] (data.task_data)
    source: str = "built-in"       # the file it came from, for error messages

    def __post_init__(self):
        where = f"{self.source}: task {self.name!r}"
        try:
            parts = list(string.Formatter().parse(self.prompt))
        except ValueError as e:
            raise ValueError(f"{where}: the prompt is not a valid template ({e}; write literal braces as {{{{ }}}})")
        styled = [(name, f"{'!' + conv if conv else ''}{':' + spec if spec else ''}") for _, name, spec, conv in parts
                  if spec or conv]
        if styled:   # the row's text goes in as it is: a width or !r would change (or blow up) every prompt
            name, style = styled[0]
            raise ValueError(f"{where}: prompt field {{{name}{style}}} takes no format spec or conversion; write "
                             f"{{{name}}}")
        self.segments = [(literal, name) for literal, name, _, _ in parts]   # [(text, field after it or None)]
        self.fields = [name for _, name in self.segments if name is not None]
        if not self.fields:
            raise ValueError(f"{where}: the prompt has no field such as {{text}} for the rows' text")
        bad = [f for f in self.fields if not f.isidentifier()]
        if bad or len(set(self.fields)) < len(self.fields):
            raise ValueError(f"{where}: prompt fields must be distinct names of the rows' keys, got {self.fields}")
        if not isinstance(self.labels, dict) or len(self.labels) < 2:
            raise ValueError(f"{where}: a task needs at least two labels (name -> answer word), got {self.labels!r}")
        if not all(isinstance(k, str) and isinstance(w, str) and w.strip() for k, w in self.labels.items()):
            raise ValueError(f"{where}: labels must map names to non-empty answer words, got {self.labels!r}")
        multiline = [label for label, word in self.labels.items() if "\n" in word.strip()]
        if multiline:   # the answer rule reads the generation's first line: such a word could never be answered
            raise ValueError(f"{where}: label {multiline[0]!r}'s answer word {self.labels[multiline[0]]!r} holds a "
                             f"line break; an answer is one line")
        seen: dict[str, str] = {}
        for label, word in self.labels.items():
            if word in seen:
                raise ValueError(f"{where}: labels {seen[word]!r} and {label!r} have the same answer word {word!r}")
            seen[word] = label
        hub = self.hub
        if hub is not None and not (isinstance(hub, dict) and isinstance(hub.get("repo"), str)
                                    and isinstance(hub.get("files"), dict)):
            raise ValueError(f"{where}: hub must be {{\"repo\": \"owner/name\", \"revision\": ..., \"files\": "
                             f"{{\"train\": PATH, \"validation\": PATH}}}}, got {hub!r}")

    @property
    def prefix(self) -> str:
        """The prompt's text before its first field: the same in every prompt."""
        return self.segments[0][0]

    def format(self, fields: dict[str, str]) -> str:
        """The prompt text for one row's fields (the model continues from here)."""
        return self.prompt.format_map(fields)

    def label_name(self, value) -> str:
        """A label as the data spells it (a name, or an int indexing the labels' order) -> its name."""
        names = list(self.labels)
        if isinstance(value, str) and value in self.labels:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return names[value]
        raise ValueError(f"unknown label {value!r} (task {self.name} expects {', '.join(map(repr, names))} "
                         f"or 0..{len(names) - 1})")

    def to_dict(self) -> dict:
        """The task as a task file holds it: a run writes it beside its adapter (task.json), data source included."""
        return {k: getattr(self, k) for k in KEYS if k != "hub" or self.hub is not None}


def task_from_dict(d: dict, source: str) -> Task:
    if not isinstance(d, dict) or not {"name", "prompt", "labels"} <= d.keys():
        raise ValueError(f"{source}: a task is a JSON object with at least name, prompt and labels")
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} (a task has {', '.join(KEYS)})")
    return Task(**d, source=source)


POST_HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n### Instruction:\n")

# The blog post's task (BrainPad, 2023: "OpenCALM-7Bにファインチューニングを実施してポジネガ分析に関して賢くなるかを確認
# してみた"): its Alpaca template, English header, Japanese instruction.
MARC_JA = Task(
    name="marc-ja",
    prompt=POST_HEADER + "この文章は、「ポジティブ」ですか?「ネガティブ」ですか?「ポジティブ」か「ネガティブ」のどちらかを"
                       "書いて。\n\n### Input:\n{sentence}\n\n### Response:\n",
    labels={"positive": "ポジティブ", "negative": "ネガティブ"}, id_field="review_id",
    hub=JGLUE | {"files": {"train": "MARC-ja/jglue-train.parquet", "validation": "MARC-ja/jglue-validation.parquet"},
                 "validation_counts": {"rows": 5654, "positive": 4832}})   # JGLUE v1.1's validation split

# JGLUE's JNLI: does the premise entail the hypothesis, contradict it, or neither? Labels in JGLUE's ClassLabel
# order. The Parquet paths follow MARC-ja's and are not verified from here (no hub access).
JNLI = Task(
    name="jnli",
    prompt=POST_HEADER + "前提と仮説の関係は「含意」「矛盾」「中立」のどれですか?どれか一つを書いて。\n\n### Input:\n"
                       "前提: {sentence1}\n仮説: {sentence2}\n\n### Response:\n",
    labels={"entailment": "含意", "contradiction": "矛盾", "neutral": "中立"}, id_field="sentence_pair_id",
    hub=JGLUE | {"files": {"train": "JNLI/jglue-train.parquet", "validation": "JNLI/jglue-validation.parquet"}})

BUILTIN = {t.name: t for t in (MARC_JA, JNLI)}


def load_task(task: "str | Path | Task") -> Task:
    """A built-in task by name, a task JSON file, or a Task as is."""
    if isinstance(task, Task):
        return task
    if str(task) in BUILTIN:
        return BUILTIN[str(task)]
    if not Path(task).is_file():
        raise FileNotFoundError(f"{task}: neither a built-in task ({', '.join(BUILTIN)}) nor a task JSON file")
    return task_from_dict(read_json(task, "a task file"), str(task))


def find_task(task: "str | Path | Task | None", *folders) -> Task:
    """`task` as given; else the task.json that a training run wrote beside its adapter (or into a merged model's
    folder), the first of `folders` that has one; else marc-ja."""
    if task is not None:
        return load_task(task)
    saved = next((Path(f) / "task.json" for f in folders if f and (Path(f) / "task.json").is_file()), None)
    return MARC_JA if saved is None else load_task(saved)
