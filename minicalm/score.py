"""Scoring: parse a generated answer, compute metrics, and score the label words by log-likelihood."""
from __future__ import annotations

import math

import torch

from .data import LABEL_WORDS

LABELS = ("positive", "negative")
_OPENERS = "「『\"'“‘"   # quotes a model may open its answer with (the instruction quotes the words 「」)


def parse_answer(text: str) -> str:
    """"positive", "negative" or "invalid" for a continuation generated after the prompt.

    Rule: drop leading whitespace (blank lines included) and take the first line; strip its whitespace and any
    opening quotes 「『"'“‘. The answer is valid if that line begins with ポジティブ or ネガティブ and the other
    word does not appear anywhere on it. Extra text after the word on the same line is fine (ポジティブです。);
    later lines are ignored. Anything else is invalid: empty output, English words (Positive), a sentence
    that mentions the word later on (この文章はポジティブです), or both words on the first line.
    """
    line = text.lstrip().split("\n", 1)[0].strip().lstrip(_OPENERS)
    found = [label for label, word in LABEL_WORDS.items() if word in line]
    if len(found) == 1 and line.startswith(LABEL_WORDS[found[0]]):
        return found[0]
    return "invalid"


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


def compute_metrics(golds: list[str], preds: list[str]) -> dict:
    """Accuracy and friends; an invalid answer counts as wrong everywhere except valid_accuracy.

    confusion[gold][pred] counts gold ∈ positive/negative against pred ∈ positive/negative/invalid.
    Per class: precision = correct / predicted as the class, recall = correct / gold of the class (an invalid
    answer is a miss), F1. macro_f1 and balanced_accuracy (mean recall) average the two classes;
    majority_baseline is the accuracy of always answering this split's majority gold class.
    """
    if len(golds) != len(preds) or not golds:
        raise ValueError(f"need as many predictions as gold labels (at least one): {len(golds)} vs {len(preds)}")
    if set(golds) - set(LABELS) or set(preds) - {*LABELS, "invalid"}:
        raise ValueError(f"golds must be {LABELS}, preds also 'invalid': got {sorted(set(golds) | set(preds))}")
    n = len(golds)
    confusion = {g: {p: 0 for p in (*LABELS, "invalid")} for g in LABELS}
    for g, p in zip(golds, preds):
        confusion[g][p] += 1
    correct = sum(confusion[c][c] for c in LABELS)
    invalid = sum(confusion[g]["invalid"] for g in LABELS)
    per_class = {}
    for c in LABELS:
        predicted, support = sum(confusion[g][c] for g in LABELS), sum(confusion[c].values())
        precision, recall = _ratio(confusion[c][c], predicted), _ratio(confusion[c][c], support)
        per_class[c] = {"precision": precision, "recall": recall, "support": support,
                        "f1": _ratio(2 * precision * recall, precision + recall)}
    majority = max(LABELS, key=lambda c: per_class[c]["support"])   # ties go to positive
    return {
        "n": n, "accuracy": correct / n, "accuracy_ci95": wilson_interval(correct, n),
        "invalid_rate": invalid / n, "n_valid": n - invalid, "valid_accuracy": _ratio(correct, n - invalid),
        "confusion": confusion, "per_class": per_class,
        "macro_f1": sum(per_class[c]["f1"] for c in LABELS) / 2,
        "balanced_accuracy": sum(per_class[c]["recall"] for c in LABELS) / 2,
        "majority_label": majority, "majority_baseline": per_class[majority]["support"] / n,
    }


@torch.inference_mode()
def label_logprobs(model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """(N, len(answers)) fp32: the summed log-probability of each answer's tokens after each prompt.

    Choices are scored as the JP LM evaluation harness does. Each (prompt, answer) pair is one right-padded row
    (right padding cannot reach real tokens under causal attention); rows are sorted by length to pad little,
    and the vocabulary-wide head runs only at the positions that predict answer tokens (logits_at).
    Call model.eval() first: LoRA dropout would otherwise be active.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token to condition the answer on")
    device = next(model.parameters()).device
    pairs = sorted(((i, j) for i in range(len(prompts)) for j in range(len(answers))),
                   key=lambda ij: len(prompts[ij[0]]) + len(answers[ij[1]]))
    out = torch.zeros(len(prompts), len(answers))
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        seqs = [prompts[i] + answers[j] for i, j in chunk]
        ids = torch.zeros(len(chunk), max(map(len, seqs)), dtype=torch.long)   # pad id is irrelevant on the right
        at = torch.zeros_like(ids, dtype=torch.bool)
        targets, rows = [], []
        for r, ((i, j), seq) in enumerate(zip(chunk, seqs)):
            ids[r, : len(seq)] = torch.tensor(seq)
            p, a = len(prompts[i]), len(answers[j])
            at[r, p - 1: p - 1 + a] = True   # position t predicts token t + 1
            targets += answers[j]
            rows += [r] * a
        logits = model(ids.to(device), logits_at=at.to(device))                # (N_at, V), row-major order of `at`
        logp = logits.float().log_softmax(-1)                                   # fp32 even for a bf16 model
        picked = logp.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1).cpu()
        sums = torch.zeros(len(chunk)).index_add_(0, torch.tensor(rows, dtype=torch.long), picked)
        for r, (i, j) in enumerate(chunk):
            out[i, j] = sums[r]
    return out
