"""Scoring: parse a generated answer and compute the metrics (label likelihoods come from generate.py); free-form
answers by exact match and character F1 against their references, and by the metrics a task names (llm-jp-eval's:
its fuzzy char_f1, set_f1, Pearson and Spearman of answers read as numbers); multiple choice by accuracy and the JP
LM evaluation harness's length-normalised accuracy."""
from __future__ import annotations

import math
import re
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


def choice_answer(continuation: str, choices) -> int | None:
    """A multiple-choice answer as written: its first line, matched to one of the row's choices after NFKC (the
    index), or None: no valid answer."""
    said = normalize(continuation.lstrip().split("\n", 1)[0])
    return next((i for i, c in enumerate(choices) if normalize(c) == said), None)


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


def text_metrics(references: list[list[str]], answers: list[str], names: list[str] | tuple = ()) -> dict:
    """exact_match and char_f1, each row's best over its references (as SQuAD scores several golds), averaged; the
    share of empty answers; a 95% interval of exact_match; and each metric of `names` (a task's metrics):
    token_sort_ratio and set_f1 (the best over the references, averaged), pearson and spearman (of the answers read
    as numbers against the first reference's number, with how many answers were no number: n_unparsable)."""
    if len(references) != len(answers) or not answers:
        raise ValueError(f"need as many answers as reference lists (at least one): {len(answers)} vs "
                         f"{len(references)}")
    em = [max(normalize(a) == normalize(r) for r in refs) for refs, a in zip(references, answers)]
    f1 = [max(char_f1(a, r) for r in refs) for refs, a in zip(references, answers)]
    n = len(answers)
    out = {"n": n, "exact_match": sum(em) / n, "exact_match_ci95": wilson_interval(sum(em), n),
           "char_f1": sum(f1) / n, "empty_rate": sum(not normalize(a) for a in answers) / n}
    for name in ("token_sort_ratio", "set_f1"):
        if name in names:
            score = PER_ROW[name]
            out[name] = sum(max(score(normalize(a), normalize(r)) for r in refs)
                            for refs, a in zip(references, answers)) / n
    if {"pearson", "spearman"} & set(names):
        golds, read = [float(refs[0]) for refs in references], [llm_jp_float(a) for a in answers]
        guesses = [UNPARSABLE if x is None else x for x in read]
        out |= {name: fn(golds, guesses) for name, fn in (("pearson", pearson), ("spearman", spearman))
                if name in names} | {"n_unparsable": sum(x is None for x in read)}
    return out


# ----------------------------------------------------------------------------- llm-jp-eval's metrics
# As llm-jp-eval computes them (github.com/llm-jp/llm-jp-eval, src/llm_jp_eval/utils.py and evaluator.py): both texts
# NFKC-normalised; char_f1 is fuzzywuzzy's (now thefuzz's) token_sort_ratio / 100, not SQuAD's character F1 (minicalm
# calls it token_sort_ratio); set_f1 compares the sets of lines; pearson and spearman are scipy's over the answers
# read as numbers (everything but digits and "." removed; what float() then refuses counts as -2.0), a NaN
# correlation (a constant side) counting as 0. Written out here, checked against scipy and thefuzz in the tests.

UNPARSABLE = -2.0   # llm-jp-eval's value for an answer that reads as no number


def llm_jp_float(text: str) -> float | None:
    """An answer read as a number by llm-jp-eval's rule (NFKC, then only digits and "." kept); None where float()
    refuses what is left ("", ".", "1.2.3"), which llm-jp-eval scores as UNPARSABLE."""
    try:
        return float(re.sub(r"[^0-9.]", "", unicodedata.normalize("NFKC", str(text))))
    except ValueError:
        return None


def token_sort_ratio(answer: str, reference: str) -> float:
    """thefuzz's fuzz.token_sort_ratio(answer, reference) / 100, which llm-jp-eval reports as char_f1: both texts
    lose the characters U+0080-U+00FF (its force_ascii), every other character that is not a letter or digit becomes
    a space, letters are lowercased; the whitespace-separated tokens are sorted and joined by one space; the score is
    the Indel similarity 1 - (len a + len b - 2 LCS) / (len a + len b) of the two, in whole percent (Python's round: ties to even). Two texts
    with no token left agree (1.0); one alone scores 0."""
    a, b = (" ".join(sorted(sort_tokens(t))) for t in (answer, reference))
    if not a or not b:
        return float(a == b)
    total = len(a) + len(b)   # rapidfuzz's order of operations, so that ties round as in thefuzz
    return round(100 * (1 - (total - 2 * lcs_length(a, b)) / total)) / 100


def sort_tokens(text: str) -> list[str]:
    """thefuzz's full_process (force_ascii: U+0080-U+00FF dropped) then rapidfuzz's default_process, as tokens."""
    kept = "".join(c for c in text if not 0x80 <= ord(c) <= 0xFF)
    return "".join((c.lower() if len(c.lower()) == 1 else c) if c.isalnum() else " " for c in kept).split()


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): one bit per character of a, one pass of
    integer arithmetic per character of b, so long answers cost O(len b) big-integer steps, not len a x len b."""
    masks: dict[str, int] = {}
    for i, c in enumerate(a):
        masks[c] = masks.get(c, 0) | 1 << i
    full = (1 << len(a)) - 1
    v = full
    for c in b:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def set_f1(answer: str, reference: str) -> float:
    """llm-jp-eval's set_f1: the answer's lines as a set and the reference's as a list (each stripped); precision and
    recall of the answer lines found among the reference's, and their F1 (0 when both are 0)."""
    got, want = {x.strip() for x in answer.split("\n")}, [x.strip() for x in reference.split("\n")]
    hits = sum(x in want for x in got)
    p, r = hits / len(got), hits / len(want)
    return 2 * p * r / (p + r) if p + r else 0.0


PER_ROW = {"token_sort_ratio": token_sort_ratio, "set_f1": set_f1}


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson's r (scipy.stats.pearsonr's statistic); 0.0 where it is undefined (a constant side, fewer than two
    rows): llm-jp-eval counts a NaN correlation as 0."""
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    dx, dy = [v - mx for v in x], [v - my for v in y]
    sxx, syy = sum(d * d for d in dx), sum(d * d for d in dy)
    if sxx == 0 or syy == 0:
        return 0.0
    return max(-1.0, min(1.0, sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sxx * syy)))


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks (scipy.stats.rankdata's "average")."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho (scipy.stats.spearmanr's statistic): Pearson's r of the ranks; 0.0 where undefined."""
    return pearson(ranks(x), ranks(y))


# ----------------------------------------------------------------------------- multiple choice

def choice_metrics(golds: list[int], answers: list[int], answers_norm: list[int], n_choices: list[int]) -> dict:
    """Accuracy of the choices picked by log-likelihood and by log-likelihood per character of the choice (the JP LM
    evaluation harness's acc and acc_norm), each with its 95% interval, and chance: the mean of 1 / choices."""
    n = len(golds)
    if not n or not len(answers) == len(answers_norm) == len(n_choices) == n:
        raise ValueError(f"need one answer of each kind per gold (at least one): {n}, {len(answers)}, "
                         f"{len(answers_norm)}, {len(n_choices)}")
    right, right_norm = (sum(a == g for a, g in zip(got, golds)) for got in (answers, answers_norm))
    return {"n": n, "accuracy": right / n, "accuracy_ci95": wilson_interval(right, n),
            "accuracy_norm": right_norm / n, "accuracy_norm_ci95": wilson_interval(right_norm, n),
            "chance": sum(1 / k for k in n_choices) / n}


def generated_choice_metrics(golds: list[int], answers: list[int | None], n_choices: list[int]) -> dict:
    """Greedy answers matched to the row's choices: accuracy, the share that matched no choice (invalid), accuracy
    among the valid ones, and chance."""
    n, valid = len(golds), sum(a is not None for a in answers)
    right = sum(a == g for a, g in zip(answers, golds))
    return {"n": n, "accuracy": right / n, "accuracy_ci95": wilson_interval(right, n), "invalid_rate": 1 - valid / n,
            "n_valid": valid, "valid_accuracy": _ratio(right, valid), "chance": sum(1 / k for k in n_choices) / n}
