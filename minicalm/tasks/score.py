"""Scoring: parse a generated answer and compute the metrics (label likelihoods come from generate.py); free-form
answers by exact match and character F1 against their references."""
from __future__ import annotations

import math
import unicodedata
from collections import Counter

from .task import MARC_JA

_OPENERS = "「『\"'“‘"   # quotes a model may open its answer with (the post's instruction quotes the words 「」)
INVALID = "invalid"      # the confusion matrix's column for answers that are no label word


def parse_answer(text: str, words: dict[str, str] = MARC_JA.labels) -> str | None:
    """The label whose answer word a continuation generated after the prompt gives, or None (no valid answer).

    Rule: drop leading whitespace (blank lines included) and take the first line; strip its whitespace and any
    opening quotes 「『"'“‘. The answer is valid if that line begins with a label's word (the longest such word)
    and no other label's word appears on the rest of the line. Extra text after the word is fine (ポジティブです。);
    later lines are ignored. Anything else is invalid: empty output, English words (Positive), a sentence that
    mentions the word later on (この文章はポジティブです), or two label words on the first line.
    """
    line = text.lstrip().split("\n", 1)[0].strip().lstrip(_OPENERS)
    starts = [label for label, word in words.items() if line.startswith(word)]
    if not starts:
        return None
    label = max(starts, key=lambda k: len(words[k]))
    rest = line[len(words[label]):]
    return None if any(w in rest for k, w in words.items() if k != label) else label


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0   # a zero denominator (no such prediction or gold) counts as 0, as sklearn does


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> list[float]:
    """95% Wilson score interval for a proportion k/n (better than p ± z·se near 0 or 1, e.g. accuracy 95%)."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def compute_metrics(golds: list[str], preds: list[str | None], labels=tuple(MARC_JA.labels)) -> dict:
    """Accuracy and friends over N labels; an invalid answer (None) counts as wrong everywhere but valid_accuracy.

    confusion[gold][pred] counts each gold label against each predicted label and "invalid" (an N x (N+1) matrix).
    Per class: precision = correct / predicted as the class, recall = correct / gold of the class (an invalid
    answer is a miss), F1. macro_f1 and balanced_accuracy (mean recall) average the classes; majority_baseline is
    the accuracy of always answering this split's majority gold class.
    """
    labels = list(labels)
    preds = [INVALID if p is None else p for p in preds]
    if len(golds) != len(preds) or not golds:
        raise ValueError(f"need as many predictions as gold labels (at least one): {len(golds)} vs {len(preds)}")
    if set(golds) - set(labels) or set(preds) - {*labels, INVALID}:
        raise ValueError(f"golds must be among {labels}, preds also None: got {sorted(set(golds) | set(preds))}")
    n = len(golds)
    confusion = {g: {p: 0 for p in (*labels, INVALID)} for g in labels}
    for g, p in zip(golds, preds):
        confusion[g][p] += 1
    correct = sum(confusion[c][c] for c in labels)
    invalid = sum(confusion[g][INVALID] for g in labels)
    per_class = {}
    for c in labels:
        predicted, support = sum(confusion[g][c] for g in labels), sum(confusion[c].values())
        precision, recall = _ratio(confusion[c][c], predicted), _ratio(confusion[c][c], support)
        per_class[c] = {"precision": precision, "recall": recall, "support": support,
                        "f1": _ratio(2 * precision * recall, precision + recall)}
    majority = max(labels, key=lambda c: per_class[c]["support"])   # ties go to the first label
    return {
        "n": n, "accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
        "invalid_rate": invalid / n, "n_valid": n - invalid, "valid_accuracy": _ratio(correct, n - invalid),
        "confusion": confusion, "per_class": per_class,
        "macro_f1": sum(per_class[c]["f1"] for c in labels) / len(labels),
        "balanced_accuracy": sum(per_class[c]["recall"] for c in labels) / len(labels),
        "majority_label": majority, "majority_baseline": per_class[majority]["support"] / n,
    }


# ----------------------------------------------------------------------------- free-form answers

def free_answer(continuation: str, stop: list[str] | None = None) -> str:
    """A free-form answer: the continuation (already cut at EOS) up to its first stop string, without surrounding
    whitespace."""
    for s in stop or []:
        continuation = continuation.split(s, 1)[0]
    return continuation.strip()


def normalize(text: str) -> str:
    """What both sides of a comparison are reduced to: NFKC (full-width letters and digits become ASCII, half-width
    katakana full-width, compatibility characters their plain forms), then surrounding whitespace removed. Inner
    whitespace and punctuation count."""
    return unicodedata.normalize("NFKC", text).strip()


def char_f1(answer: str, reference: str) -> float:
    """SQuAD's F1 with characters as tokens (Japanese has no spaces between words): precision and recall of the
    characters the two share, counted as multisets, after normalize(); two empty texts agree."""
    a, r = normalize(answer), normalize(reference)
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r:
        return float(a == r)
    return 0.0 if common == 0 else 2 * common / (len(a) + len(r))


def text_metrics(references: list[list[str]], answers: list[str]) -> dict:
    """exact_match and char_f1, each row's best over its references (as SQuAD scores several golds), averaged; the
    share of empty answers; a 95% interval of exact_match."""
    if len(references) != len(answers) or not answers:
        raise ValueError(f"need as many answers as reference lists (at least one): {len(answers)} vs "
                         f"{len(references)}")
    em = [max(normalize(a) == normalize(r) for r in refs) for refs, a in zip(references, answers)]
    f1 = [max(char_f1(a, r) for r in refs) for refs, a in zip(references, answers)]
    n = len(answers)
    return {"n": n, "exact_match": sum(em) / n, "exact_match_ci95": wilson_interval(sum(em), n),
            "char_f1": sum(f1) / n, "empty_rate": sum(not normalize(a) for a in answers) / n}
