"""MARC-ja data: the prompt, reading and downloading reviews, encoding them for training and evaluation, batching.

Training and evaluation both tokenize through `PromptEncoder`, segment by segment
(head + review + tail + answer + eos), so the shared head has the same ids for every review and a prompt is
tokenized identically whether it is trained on or evaluated.
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .loss import IGNORE_INDEX
from .weights import atomic_write

# The Alpaca template of the blog post (FACTS.md section 1): English header, Japanese instruction.
PROMPT_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
    "この文章は、「ポジティブ」ですか?「ネガティブ」ですか?「ポジティブ」か「ネガティブ」のどちらかを書いて。\n\n"
    "### Input:\n"
)
PROMPT_TAIL = "\n\n### Response:\n"
LABEL_WORDS = {"positive": "ポジティブ", "negative": "ネガティブ"}

# JGLUE's JSON files spell labels as words; its Parquet conversion as ClassLabel ints.
_LABELS = {"positive": "positive", "negative": "negative", 0: "positive", 1: "negative"}
HUB_REPO, HUB_REVISION = "shunk031/JGLUE", "refs/convert/parquet"
VALID_ROWS, VALID_POSITIVE = 5654, 4832   # the official MARC-ja validation split


def format_prompt(review: str) -> str:
    """The prompt text up to and including the newline after `### Response:`; the model continues from there."""
    return PROMPT_HEAD + review + PROMPT_TAIL


@dataclass
class Review:
    sentence: str
    label: str       # "positive" or "negative"
    review_id: str


def normalize_label(value) -> str:
    """"positive"/"negative", or the Parquet ints 0 (positive) / 1 (negative); anything else is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value not in _LABELS:
        raise ValueError(f"unknown label {value!r} (expected 'positive', 'negative', 0 or 1)")
    return _LABELS[value]


def _parse_review(line: str) -> Review:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(row, dict) or not {"sentence", "label", "review_id"} <= row.keys():
        raise ValueError("expected a JSON object with fields sentence, label, review_id")
    if not isinstance(row["sentence"], str):
        raise ValueError(f"sentence is {type(row['sentence']).__name__}, not a string")
    return Review(row["sentence"], normalize_label(row["label"]), str(row["review_id"]))


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Review]:
    """Reviews from a JGLUE-format JSON-lines file (sentence, label, review_id); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (JSON lines of MARC-ja reviews expected)")
    reviews: list[Review] = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(reviews) >= limit:
                break
            if line.strip():
                try:
                    reviews.append(_parse_review(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
    if not reviews and limit != 0:
        raise ValueError(f"{path}: no reviews in the file")
    return reviews


def parquet_to_jsonl(parquet_path: str | Path, out_path: str | Path) -> dict[str, int]:
    """Convert a MARC-ja Parquet file (int labels) to JGLUE JSON lines, atomically; returns row counts."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError('reading MARC-ja\'s Parquet files needs pyarrow: pip install "minicalm[marc]"') from None
    try:
        rows = pq.read_table(parquet_path, columns=["sentence", "label", "review_id"]).to_pylist()
    except Exception as e:   # pyarrow's errors (missing column, not Parquet) share no useful base class
        raise ValueError(f"{parquet_path}: not a MARC-ja Parquet file ({e})") from None
    lines, counts = [], {"rows": 0, "positive": 0, "negative": 0}
    for n, row in enumerate(rows):
        try:
            label = normalize_label(row["label"])
        except ValueError as e:
            raise ValueError(f"{parquet_path}: row {n}: {e}") from None
        counts["rows"] += 1
        counts[label] += 1
        lines.append(json.dumps({"sentence": row["sentence"], "label": label, "review_id": str(row["review_id"])},
                                ensure_ascii=False))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return counts


def marc_ja(split: str, cache_dir: str | Path | None = None) -> Path:
    """Path of MARC-ja's train or validation split as JGLUE JSON lines, downloaded and converted on first use."""
    split = {"valid": "validation"}.get(split, split)
    if split not in ("train", "validation"):
        raise ValueError(f"MARC-ja split {split!r}: expected 'train' or 'validation' (test labels were never released)")
    out = Path(cache_dir or "~/.cache/minicalm/marc-ja").expanduser() / f"{split}.jsonl"
    if out.is_file():
        return out
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    try:
        parquet = hf_hub_download(HUB_REPO, f"MARC-ja/jglue-{split}.parquet", repo_type="dataset",
                                  revision=HUB_REVISION)
    except (OSError, HfHubHTTPError, EntryNotFoundError) as e:
        raise FileNotFoundError(
            f"could not download MARC-ja {split} (dataset {HUB_REPO}, revision {HUB_REVISION}): "
            f"{type(e).__name__}: {e}. Without the hub, pass JGLUE JSON-lines files with --train-file/--valid-file."
        ) from e
    counts = parquet_to_jsonl(parquet, out)
    if split == "validation" and (counts["rows"], counts["positive"]) != (VALID_ROWS, VALID_POSITIVE):
        warnings.warn(f"{out}: MARC-ja validation has {counts['rows']} rows / {counts['positive']} positive, "
                      f"expected {VALID_ROWS} / {VALID_POSITIVE} (a 5,734-row file is the unofficial regeneration)")
    return out


class PromptEncoder:
    """Token ids of prompts and training examples: enc(HEAD) + enc(review) + enc(TAIL) [+ enc(word) + eos].

    Only the review is ever truncated (its end is cut), to leave room for the longest answer + eos within
    max_len; the cut does not depend on the label, so training and evaluation see the same prompt.
    """

    def __init__(self, tokenizer, max_len: int = 256):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.eos_id = tokenizer.eos_token_id
        self.prefix_ids = tokenizer.encode(PROMPT_HEAD)
        self.tail_ids = tokenizer.encode(PROMPT_TAIL)
        self.answer_ids = {label: tokenizer.encode(word) for label, word in LABEL_WORDS.items()}   # without eos
        fixed = len(self.prefix_ids) + len(self.tail_ids) + max(map(len, self.answer_ids.values())) + 1
        self.review_budget = max_len - fixed   # the most review tokens that fit
        if self.review_budget < 1:
            raise ValueError(f"max_len {max_len} leaves no room for the review: the prompt's head, tail and the "
                             f"longest answer + eos take {fixed} tokens with this tokenizer")

    def review_ids(self, review: str) -> list[int]:
        return self.tokenizer.encode(review)

    def prompt_from_ids(self, review_ids: list[int]) -> tuple[list[int], bool]:
        return self.prefix_ids + review_ids[: self.review_budget] + self.tail_ids, len(review_ids) > self.review_budget

    def example_from_ids(self, review_ids: list[int], label: str,
                         train_on_inputs: bool = False) -> tuple[list[int], list[int], bool]:
        if label not in self.answer_ids:
            raise ValueError(f"unknown label {label!r} (expected one of {sorted(self.answer_ids)})")
        prompt, truncated = self.prompt_from_ids(review_ids)
        answer = self.answer_ids[label] + [self.eos_id]
        ids = prompt + answer
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + answer
        return ids, labels, truncated

    def encode_prompt(self, review: str) -> tuple[list[int], bool]:
        """(ids of HEAD + review + TAIL, whether the review was cut)."""
        return self.prompt_from_ids(self.review_ids(review))

    def encode_prompts(self, reviews: list[str]) -> list[tuple[list[int], bool]]:
        """encode_prompt for many reviews, tokenized in one parallel batch."""
        return [self.prompt_from_ids(r) for r in self.tokenizer.encode_batch(reviews)]

    def encode_example(self, review: str, label: str,
                       train_on_inputs: bool = False) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated). labels align with input_ids (the loss shifts them) and are -100
        except on the answer + eos; with train_on_inputs they equal input_ids (loss on the whole sequence)."""
        return self.example_from_ids(self.review_ids(review), label, train_on_inputs)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_reviews(encoder: PromptEncoder, reviews: list[Review],
                   train_on_inputs: bool = False) -> tuple[list[Example], int]:
    """(examples, how many reviews were truncated), tokenized in one parallel batch."""
    examples, n_truncated = [], 0
    for rev, rids in zip(reviews, encoder.tokenizer.encode_batch([r.sentence for r in reviews])):
        ids, labels, truncated = encoder.example_from_ids(rids, rev.label, train_on_inputs)
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
