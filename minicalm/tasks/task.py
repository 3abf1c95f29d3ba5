"""A task: the prompt a model answers and what it answers with: one of N label words (text classification), a
free-form text of the row's own (instructions, extractive QA, a number), or one of the row's own choices (multiple
choice).

As a JSON file (`--task FILE`), or built in by name (`--task marc-ja`, the default, `jnli`, `alpaca`, `jsquad`, `jsts`,
`jcommonsenseqa`):

    {"name": "amazon-ja-3",
     "prompt": "...### Input:\\n{text}\\n\\n### Response:\\n",
     "labels": {"positive": "ポジティブ", "neutral": "ニュートラル", "negative": "ネガティブ"},
     "label_field": "label",
     "id_field": "id",
     "hub": {"repo": "owner/name", "revision": "main", "files": {"train": "train.parquet", "validation": ...}}}

Fields in braces name the keys of the data's JSON rows (`{sentence1}`, `{sentence2}` for pairs; `{{` and `}}` are
literal braces). The prompt ends where the answer begins: a training example is the prompt, the answer, then EOS.
`labels` maps each label name to its answer word, in the order that integer labels in the data index.
`label_field` defaults to "label"; `id_field` is optional (a row without an id gets its line number); `hub`, also
optional, names a hub dataset's Parquet files holding the task's rows (the built-in tasks have one). The text
before the first field is the same in every prompt, the shared prefix: evaluation computes it once per run, training
once per micro-batch.

A free-form task names the row field holding its answer, `"answer_field": "output"`, instead of `labels`: a text, or
a list of references (all are scored, the first is trained on). Its optional keys: `max_new_tokens` (the longest
answer, in tokens; default 128), `stop` (strings that end an answer besides EOS, e.g. ["\\n"]), `prompt_no_input`
(a second template for rows whose fields missing from it are empty: Alpaca's pair), `columns` (a field's key in the
data where it differs: {"input": "context", "output": "response"} for Dolly), `cut` (the fields a long prompt may be
cut in; default all), `few_shots` (solved rows for `--shots`), and `from` (a built-in task whose keys this file
changes: {"from": "alpaca", "name": "dolly-ja", "columns": {...}}), `metrics` (what the answers are scored by besides
exact_match and char_f1: METRICS), `decimals` (an answer field holding a number is written as text with that many
decimals: JSTS's similarity). An llm-jp-eval evaluation file (`instruction`, `output_length`, `metrics`, `few_shots`,
`samples`) is read as a free-form task holding its rows.

A multiple-choice task names the row fields holding its choices, `"choice_fields": ["choice0", ..., "choice4"]`, or
one field holding them as a list, `"choices_field": "choices"` (its items are the prompt's {choice0}, {choice1}, ...),
instead of labels; `label_field` holds the right choice's index. It trains on the right choice's text and is
scored by every choice's log-likelihood after the prompt.
"""
from __future__ import annotations

import math
import string
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..io.files import read_json

KEYS = ("name", "prompt", "labels", "label_field", "id_field", "hub", "answer_field", "prompt_no_input", "columns",
        "cut", "max_new_tokens", "stop", "few_shots", "choice_fields", "choices_field", "metrics", "decimals",
        "llm_jp_eval_metrics")
FREE_FORM_TOKENS = 128   # a free-form answer's default budget
# The metrics a task may name (tasks/score.py computes each), in minicalm's names. char_f1 is SQuAD's F1 over
# characters; token_sort_ratio is what llm-jp-eval calls char_f1 (thefuzz's fuzzy ratio of the sorted tokens).
METRICS = ("exact_match", "char_f1", "token_sort_ratio", "set_f1", "pearson", "spearman")
# llm-jp-eval's names (its files' "metrics", github.com/llm-jp/llm-jp-eval) -> minicalm's
LLM_JP_EVAL_METRICS = {"exact_match": "exact_match", "char_f1": "token_sort_ratio", "set_f1": "set_f1",
                       "pearson": "pearson", "spearman": "spearman"}
NUMERIC = ("pearson", "spearman")   # metrics that read answers and references as numbers
# JGLUE (github.com/yahoojapan/JGLUE) no longer ships MARC-ja's reviews; the hub holds JGLUE's tasks as Parquet on
# this ref of the dataset shunk031/JGLUE, the files its loading script (JGLUE.py) falls back to.
JGLUE = {"repo": "shunk031/JGLUE", "revision": "refs/convert/parquet"}


@dataclass
class Task:
    name: str
    prompt: str                    # the template, up to where the answer begins
    labels: dict[str, str] | None = None   # label name -> answer word, in the data's integer order (label tasks)
    label_field: str = "label"
    id_field: str | None = None
    hub: dict | None = None        # where the rows live on the hub: repo, revision, files[split] (data.task_data)
    answer_field: str | None = None          # free-form: the row's answer (a text or a list of references)
    prompt_no_input: str | None = None       # the template for rows whose fields missing from it are empty
    columns: dict[str, str] | None = None    # field -> the data's key for it, where they differ
    cut: list[str] | None = None             # the fields a long prompt may be cut in (default: all)
    max_new_tokens: int | None = None        # free-form: the longest answer in tokens (default FREE_FORM_TOKENS)
    stop: list[str] | None = None            # free-form: strings that end an answer, besides EOS
    few_shots: list[dict] | None = None      # solved rows to draw --shots from (llm-jp-eval's few_shots)
    choice_fields: list[str] | None = None   # multiple choice: the row fields holding the choices, in index order
    choices_field: str | None = None         # multiple choice: the row field holding the choices as a list
    metrics: list[str] | None = None         # free-form: metrics (METRICS) besides exact_match and char_f1
    decimals: int | None = None              # free-form: a number in the answer field written with these decimals
    llm_jp_eval_metrics: list[str] | None = None   # an llm-jp-eval file's own names of its metrics, reported again
    samples: list[dict] | None = None        # the rows, when the task file holds them (llm-jp-eval); not saved
    source: str = "built-in"       # the file it came from, for error messages

    def __post_init__(self):
        where = f"{self.source}: task {self.name!r}"
        self.segments = parse_template(self.prompt, where)   # [(text, field after it or None)]
        self.fields = [name for _, name in self.segments if name is not None]
        self.short_segments = None if self.prompt_no_input is None else parse_template(self.prompt_no_input, where)
        short = [n for _, n in self.short_segments or [] if n is not None]
        if self.short_segments is not None and not set(short) < set(self.fields):
            raise ValueError(f"{where}: prompt_no_input's fields {short} must be some of the prompt's {self.fields}")
        self.optional = [f for f in self.fields if self.short_segments is not None and f not in short]
        kinds = [k for k in ("labels", "answer_field", "choice_fields", "choices_field") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"{where}: {' and '.join(kinds) + ' both given: ' if kinds else ''}a task has labels (a "
                             f"classification), answer_field (free-form answers) or choice_fields / choices_field "
                             f"(multiple choice), one of them")
        self.check_answers(where)
        answer = self.answer_field or self.label_field
        if answer in self.fields:   # the model would be shown what it is asked for
            raise ValueError(f"{where}: the prompt shows {{{answer}}}, the field that holds the answer; a prompt asks "
                             f"for it and must not contain it")
        if self.free_form:
            limit = self.max_new_tokens
            if limit is not None and not (isinstance(limit, int) and limit >= 1):
                raise ValueError(f"{where}: max_new_tokens must be a positive number of tokens, got {limit!r}")
            if self.stop is not None and not (isinstance(self.stop, list) and all(isinstance(t, str) and t
                                                                                  for t in self.stop)):
                raise ValueError(f"{where}: stop must be a list of non-empty strings, got {self.stop!r}")
        elif self.labels is not None:
            check_labels(self.labels, where)
        if self.cut is not None and not set(self.cut) <= set(self.fields):
            raise ValueError(f"{where}: cut names fields the prompt does not have: "
                             f"{sorted(set(self.cut) - set(self.fields))}")
        if self.columns is not None and not (isinstance(self.columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())):
            raise ValueError(f"{where}: columns maps field names to the data's keys, got {self.columns!r}")
        hub = self.hub
        if hub is not None and not (isinstance(hub, dict) and isinstance(hub.get("repo"), str)
                                    and isinstance(hub.get("files"), dict)):
            raise ValueError(f"{where}: hub must be {{\"repo\": \"owner/name\", \"revision\": ..., \"files\": "
                             f"{{\"train\": PATH, \"validation\": PATH}}}}, got {hub!r}")

    def check_answers(self, where: str) -> None:
        """What the kinds of tasks add: the choice fields, the metrics and decimals of free-form answers."""
        fields = self.choice_fields
        if fields is not None and not (isinstance(fields, list) and len(fields) >= 2 and len(set(fields)) == len(
                fields) and all(isinstance(f, str) and f for f in fields)):
            raise ValueError(f"{where}: choice_fields must name at least two distinct row fields, got {fields!r}")
        if self.choices_field is not None and not (isinstance(self.choices_field, str) and self.choices_field):
            raise ValueError(f"{where}: choices_field must name the row field holding the choices, got "
                             f"{self.choices_field!r}")
        metrics = self.metrics
        if metrics is not None:
            if not isinstance(metrics, list) or not metrics:
                raise ValueError(f"{where}: metrics must be a list naming at least one of {', '.join(METRICS)} (or "
                                 f"be left out), got {metrics!r}")
            unknown = [m for m in metrics if m not in METRICS]
            if unknown:
                raise ValueError(f"{where}: unknown metric {unknown[0]!r}; minicalm computes {', '.join(METRICS)}")
        for key in ("metrics", "decimals"):
            if getattr(self, key) is not None and not self.free_form:
                raise ValueError(f"{where}: {key} is for free-form answers; a label or multiple-choice task is scored "
                                 f"by accuracy")
        if self.decimals is not None and not (isinstance(self.decimals, int) and 0 <= self.decimals <= 10):
            raise ValueError(f"{where}: decimals must be a number of decimals from 0 to 10, got {self.decimals!r}")

    @property
    def free_form(self) -> bool:
        return self.answer_field is not None

    @property
    def multiple_choice(self) -> bool:
        return self.choice_fields is not None or self.choices_field is not None

    @property
    def numeric(self) -> bool:
        """Whether the answers are numbers (a metric reads them as such): every reference must be one."""
        return bool(set(self.metrics or ()) & set(NUMERIC))

    @property
    def answer_budget(self) -> int:
        """New tokens an answer may take: the task's max_new_tokens for free-form answers (or choices), 8 for a label
        word or, by default, a choice (evaluation makes room for the longest choice it is asked)."""
        return (self.max_new_tokens or FREE_FORM_TOKENS) if self.free_form else self.max_new_tokens or 8

    def key(self, field: str) -> str:
        """The data's key for a field (the column map's, else the field's own name)."""
        return (self.columns or {}).get(field, field)

    def short(self, fields: dict[str, str]) -> bool:
        """Whether a row takes prompt_no_input: the fields only the full prompt has are all empty."""
        return bool(self.optional) and not any(fields.get(f, "").strip() for f in self.optional)

    @property
    def prefix(self) -> str:
        """The prompt's text before its first field: the same in every prompt."""
        return self.segments[0][0]

    def format(self, fields: dict[str, str]) -> str:
        """The prompt text for one row's fields (the model continues from here)."""
        return (self.prompt_no_input if self.short(fields) else self.prompt).format_map(fields)

    def label_name(self, value) -> str:
        """A label as the data spells it (a name, or an int indexing the labels' order) -> its name."""
        names = list(self.labels)
        if isinstance(value, str) and value in self.labels:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return names[value]
        raise ValueError(f"unknown label {value!r} (task {self.name} expects {', '.join(map(repr, names))} "
                         f"or 0..{len(names) - 1})")

    def references(self, value) -> list[str]:
        """A free-form answer as the data holds it (a text, a list of them, SQuAD's {"text": [...]}, or a number,
        written with the task's decimals) -> the reference texts. A numeric task's references must read as
        numbers."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value) if self.decimals is None else f"{value:.{self.decimals}f}"
        refs = value.get("text") if isinstance(value, dict) else [value] if isinstance(value, str) else value
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{self.answer_field} is {type(value).__name__}, not a text or a list of texts")
        if not refs or not all(r.strip() for r in refs):
            raise ValueError(f"empty answer in {self.key(self.answer_field)!r}")
        if self.numeric:
            for r in refs:
                try:
                    if math.isfinite(float(r)):
                        continue
                except ValueError:
                    pass
                raise ValueError(f"{self.key(self.answer_field)} {r!r} is not a number (task {self.name} scores "
                                 f"{', '.join(m for m in self.metrics if m in NUMERIC)})")
        return refs

    def choices(self, row: dict) -> list[str]:
        """A multiple-choice row's choices, in index order, from its choice fields or its list of them."""
        if self.choices_field is not None:
            key = self.key(self.choices_field)
            got = row.get(key)
            if got is None:
                raise ValueError(f"no choices field {key!r}")
            if not isinstance(got, list) or not all(isinstance(c, str) for c in got) or len(got) < 2:
                raise ValueError(f"{key} must be a list of at least two texts, got {got!r}")
            items = [(f"choice {i} in {key!r}", c) for i, c in enumerate(got)]
        else:
            items = [(f"choice field {self.key(f)!r}", row.get(self.key(f))) for f in self.choice_fields]
        for name, c in items:
            if c is None:
                raise ValueError(f"no {name}")
            if not isinstance(c, str):
                raise ValueError(f"{name} is {type(c).__name__}, not a text")
            if not c.strip():
                raise ValueError(f"{name} is empty")
        return [c for _, c in items]

    def choice_index(self, value, n: int) -> int:
        """The right choice's index as the row's label_field holds it (an int in 0..n-1)."""
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{self.label_field} {value!r} is not a choice's index (an int)")
        if not 0 <= value < n:
            raise ValueError(f"{self.label_field} {value} is out of range for the row's {n} choices (0..{n - 1})")
        return value

    def fields_of(self, text: str) -> dict[str, str]:
        """A text as generate and /v1/answers take it: the task's fields, tab-separated in its order (Alpaca's input
        may be left out)."""
        values = text.split("\t") if len(self.fields) > 1 else [text]
        if set(self.fields[len(values):]) <= set(self.optional):   # Alpaca's input left out: empty
            values += [""] * (len(self.fields) - len(values))
        if len(values) != len(self.fields):
            raise ValueError(f"task {self.name} needs {len(self.fields)} tab-separated fields "
                             f"({', '.join(self.fields)}), got {len(values)} in {text!r}")
        return dict(zip(self.fields, values))

    def answer_text(self, label: str) -> str:
        """What a row's answer is written as: its label's word, or the answer itself (free-form; the right choice)."""
        return self.labels[label] if self.labels else label

    def with_shots(self, shots: list) -> "Task":
        """This task with solved rows (data.Row) written before every prompt, each in the template with its answer
        and a blank line: part of the shared prefix, so computed once."""
        text = "".join(self.format(r.fields) + self.answer_text(r.label) + "\n\n" for r in shots)
        text = text.replace("{", "{{").replace("}", "}}")
        return replace(self, prompt=text + self.prompt,
                       prompt_no_input=None if self.prompt_no_input is None else text + self.prompt_no_input)

    def to_dict(self) -> dict:
        """The task as a task file holds it: a run writes it beside its adapter (task.json), data source included
        (the rows an llm-jp-eval file holds are left out)."""
        always = ("name", "prompt") + (() if self.free_form else ("label_field", "id_field")) + \
            (("labels",) if self.labels else ())
        return {k: getattr(self, k) for k in KEYS if k in always or getattr(self, k) is not None and
                not (self.free_form and k == "label_field")}


def parse_template(template: str, where: str) -> list[tuple[str, str | None]]:
    """[(literal text, the field after it or None)]; a field with a format spec or conversion is refused."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{where}: the prompt is not a valid template ({e}; write literal braces as {{{{ }}}})")
    styled = [(name, f"{'!' + conv if conv else ''}{':' + spec if spec else ''}") for _, name, spec, conv in parts
              if spec or conv]
    if styled:   # the row's text goes in as it is: a width or !r would change (or blow up) every prompt
        name, style = styled[0]
        raise ValueError(f"{where}: prompt field {{{name}{style}}} takes no format spec or conversion; write "
                         f"{{{name}}}")
    segments = [(literal, name) for literal, name, _, _ in parts]
    fields = [name for _, name in segments if name is not None]
    if not fields:
        raise ValueError(f"{where}: the prompt has no field such as {{text}} for the rows' text")
    bad = [f for f in fields if not f.isidentifier()]
    if bad or len(set(fields)) < len(fields):
        raise ValueError(f"{where}: prompt fields must be distinct names of the rows' keys, got {fields}")
    return segments


def check_labels(labels, where: str) -> None:
    """At least two labels, each a distinct, non-empty, one-line answer word."""
    if not isinstance(labels, dict) or len(labels) < 2:
        raise ValueError(f"{where}: a task needs at least two labels (name -> answer word), got {labels!r}")
    if not all(isinstance(k, str) and isinstance(w, str) and w.strip() for k, w in labels.items()):
        raise ValueError(f"{where}: labels must map names to non-empty answer words, got {labels!r}")
    multiline = [label for label, word in labels.items() if "\n" in word.strip()]
    if multiline:   # the answer rule reads the generation's first line: such a word could never be answered
        raise ValueError(f"{where}: label {multiline[0]!r}'s answer word {labels[multiline[0]]!r} holds a "
                         f"line break; an answer is one line")
    seen: dict[str, str] = {}
    for label, word in labels.items():
        if word in seen:
            raise ValueError(f"{where}: labels {seen[word]!r} and {label!r} have the same answer word {word!r}")
        seen[word] = label


def task_from_dict(d: dict, source: str) -> Task:
    """A task file's task: its own keys, a built-in's changed ("from"), or an llm-jp-eval evaluation file's."""
    if isinstance(d, dict) and LLM_JP_EVAL & d.keys() and not {"prompt", "from"} & d.keys():
        return llm_jp_eval_task(d, source)
    if isinstance(d, dict) and "from" in d:
        if d["from"] not in BUILTIN:
            raise ValueError(f"{source}: from {d['from']!r} is not a built-in task ({', '.join(BUILTIN)})")
        d = BUILTIN[d["from"]].to_dict() | {k: v for k, v in d.items() if k != "from"}
    if not isinstance(d, dict) or not {"name", "prompt"} <= d.keys() or not {
            "labels", "answer_field", "choice_fields", "choices_field"} & d.keys():
        raise ValueError(f"{source}: a task is a JSON object with at least name, prompt and labels (or answer_field, "
                         f"choice_fields, choices_field)")
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} (a task has {', '.join(KEYS)}, or from)")
    return Task(**d, source=source)


# llm-jp-eval's evaluation files (github.com/llm-jp/llm-jp-eval): one task each, its rows in `samples`; its keys
# (few_shots may be left out: no shots; metrics: minicalm's exact_match and char_f1 alone)
LLM_JP_EVAL = {"instruction", "output_length", "metrics", "few_shots", "samples"}


def llm_jp_eval_task(d: dict, source: str) -> Task:
    """An llm-jp-eval file as a free-form task: its instruction in Alpaca's template (the post's), each sample's
    input as the Input, output the answer, output_length the answer's budget; its rows and few_shots kept."""
    missing = [k for k in ("instruction", "output_length", "samples") if k not in d]
    if missing:
        raise ValueError(f"{source}: an llm-jp-eval file without {', '.join(missing)} (it holds instruction, "
                         f"output_length, metrics, few_shots and samples)")
    samples, budget = d["samples"], d["output_length"]
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{source}: an llm-jp-eval file without samples (a list of {{\"input\", \"output\"}} rows)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"{source}: output_length must be a positive number of tokens (an answer's budget), got "
                         f"{budget!r}")
    named = d.get("metrics")
    if named is not None and (not isinstance(named, list) or not named):
        raise ValueError(f"{source}: metrics must be a list naming at least one of {', '.join(LLM_JP_EVAL_METRICS)}, "
                         f"got {named!r}")
    unknown = [m for m in named or [] if m not in LLM_JP_EVAL_METRICS]
    if unknown:   # never silently left out: a number the file asks for that nobody here computes
        raise ValueError(f"{source}: unknown metric {unknown[0]!r}; minicalm computes llm-jp-eval's "
                         f"{', '.join(LLM_JP_EVAL_METRICS)}")
    instruction = str(d["instruction"]).replace("{", "{{").replace("}", "}}")
    return replace(ALPACA, name=Path(source).stem, prompt=ALPACA.prompt.replace("{instruction}", instruction),
                   prompt_no_input=None, max_new_tokens=budget, few_shots=d.get("few_shots") or None,
                   metrics=named and list(dict.fromkeys(LLM_JP_EVAL_METRICS[m] for m in named)),
                   llm_jp_eval_metrics=named or None,
                   samples=samples, source=source)


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
# order. Its files, like every JGLUE task's, are found by listing the dataset's tree (either layout the hub has used).
JNLI = Task(
    name="jnli",
    prompt=POST_HEADER + "前提と仮説の関係は「含意」「矛盾」「中立」のどれですか?どれか一つを書いて。\n\n### Input:\n"
                       "前提: {sentence1}\n仮説: {sentence2}\n\n### Response:\n",
    labels={"entailment": "含意", "contradiction": "矛盾", "neutral": "中立"}, id_field="sentence_pair_id",
    hub=JGLUE | {"files": {"train": "JNLI/jglue-train.parquet", "validation": "JNLI/jglue-validation.parquet"}})

# Stanford Alpaca's two templates (alpaca-lora trains with them): with an input section (the post's) and, for rows
# whose input is empty, without one. Rows: instruction, input, output (Dolly's context and response: map them).
ALPACA = Task(
    name="alpaca", prompt=POST_HEADER + "{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    prompt_no_input="Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    answer_field="output", cut=["input"], max_new_tokens=256)

# JGLUE's JSQuAD: extractive QA over Japanese Wikipedia (context "title [SEP] paragraph"); the answer is a span of the
# context, scored against every gold by exact match and character F1. Only the context is ever cut.
JSQUAD = Task(
    name="jsquad",
    prompt=POST_HEADER + "文脈から質問の答えを抜き出して書いて。\n\n### Input:\n文脈: {context}\n質問: {question}\n\n"
                       "### Response:\n",
    answer_field="answers", id_field="id", cut=["context"], max_new_tokens=32, stop=["\n"],
    hub=JGLUE | {"files": {"train": "JSQuAD/jglue-train.parquet", "validation": "JSQuAD/jglue-validation.parquet"}})

# JGLUE's JSTS: how close in meaning two sentences are, a similarity from 0.0 (unrelated) to 5.0 (the same meaning),
# scored as JGLUE's README does, by Pearson's and Spearman's correlation with the gold (llm-jp-eval's rule reads the
# answers as numbers). The answer is the similarity written with one decimal (JSTS's steps are 0.2).
JSTS = Task(
    name="jsts",
    prompt=POST_HEADER + "文1と文2の意味がどれくらい近いかを、0.0(無関係)から5.0(同じ意味)までの数で書いて。\n\n"
                       "### Input:\n文1: {sentence1}\n文2: {sentence2}\n\n### Response:\n",
    answer_field="label", id_field="sentence_pair_id", max_new_tokens=8, stop=["\n"], metrics=["pearson", "spearman"],
    decimals=1,
    hub=JGLUE | {"files": {"train": "JSTS/jglue-train.parquet", "validation": "JSTS/jglue-validation.parquet"}})

# JGLUE's JCommonsenseQA: a question and five choices, `label` the right one's index; scored, as the JP LM evaluation
# harness scores it (Stability-AI/lm-evaluation-harness, jp-stable, lm_eval/tasks/ja/jcommonsenseqa.py), by each
# choice's log-likelihood after the prompt. The template is the post's Alpaca one, so that an adapter meets every
# built-in JGLUE task in the form it was trained on, with the choices listed as the harness's prompt 0.2.1 lists them
# ("- choice" lines). Not its 0.2, whose numbered choices ask for a number while the choice's text is what is scored:
# the harness itself warns that 0.2 "tends to output low scores" and recommends 0.2.1.
JCOMMONSENSEQA = Task(
    name="jcommonsenseqa",
    prompt=POST_HEADER + "質問の答えを選択肢の中から選んで、その答えを書いて。\n\n### Input:\n質問: {question}\n選択肢:\n"
                       "- {choice0}\n- {choice1}\n- {choice2}\n- {choice3}\n- {choice4}\n\n### Response:\n",
    choice_fields=[f"choice{i}" for i in range(5)], id_field="q_id", cut=["question"],
    hub=JGLUE | {"files": {"train": "JCommonsenseQA/jglue-train.parquet",
                           "validation": "JCommonsenseQA/jglue-validation.parquet"}})

BUILTIN = {t.name: t for t in (MARC_JA, JNLI, ALPACA, JSQUAD, JSTS, JCOMMONSENSEQA)}


def load_task(task: "str | Path | Task") -> Task:
    """A built-in task by name, a task JSON file, or a Task as is."""
    if isinstance(task, Task):
        return task
    if str(task) in BUILTIN:
        return BUILTIN[str(task)]
    if not Path(task).is_file():
        raise FileNotFoundError(f"{task}: neither a built-in task ({', '.join(BUILTIN)}) nor a task JSON file")
    return task_from_dict(read_json(task, "a task file"), str(task))


def find_task(task: "str | Path | Task | None", adapter=None, model=None) -> Task:
    """`task` as given; else the task.json that a training run wrote beside its adapter (or into a merged model's
    folder); else marc-ja, saying so when an adapter was given: it was tuned to answer some question, and without its
    task.json which one is not known."""
    if task is not None:
        return load_task(task)
    saved = next((Path(f) / "task.json" for f in (adapter, model) if f and (Path(f) / "task.json").is_file()), None)
    if saved is not None:
        return load_task(saved)
    if adapter:
        print(f"{adapter}: no task.json beside the adapter: asking task {MARC_JA.name}'s question (the default); pass "
              f"--task for another", file=sys.stderr)
    return MARC_JA
