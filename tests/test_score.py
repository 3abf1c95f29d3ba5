"""minicalm.tasks.score: the answer rule and the metrics against a hand-counted confusion matrix (label
log-likelihoods are generate.py's, tested against transformers in test_generate.py)."""
from __future__ import annotations

import math

import pytest

from minicalm.tasks.score import compute_metrics, parse_answer, wilson_interval


@pytest.mark.parametrize("text, expected", [
    ("ポジティブ", "positive"),
    ("ネガティブ", "negative"),
    ("ネガティブ<|endoftext|>", "negative"),
    ("", None),                                         # empty output
    ("   \n  ", None),
    ("ポジティブ ネガティブ", None),                       # both words on the first line
    ("ポジティブではなくネガティブ", None),
    ("Positive", None),                                 # English words do not count
    ("positive", None),
    ("ポジティブです。", "positive"),                          # extra text after the word is fine
    ("ネガティブな内容です", "negative"),
    ("ポジティブ\n### Instruction:\nネガティブ", "positive"),   # later lines are ignored
    ("  ネガティブ", "negative"),                              # leading whitespace
    ("\n\nポジティブ", "positive"),                            # leading blank lines
    ("\u3000ポジティブ", "positive"),                          # full-width space
    ("「ポジティブ」", "positive"),                            # quotes
    ("『ネガティブ』です", "negative"),
    ('"ポジティブ"', "positive"),
    ("この文章は「ポジティブ」です。", None),              # the word must begin the answer
    ("ポジ", None),
    ("\nこの文章は\nポジティブ", None),                    # first non-blank line decides
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_metrics_against_hand_counts():
    # gold positive: 4 -> pos, 1 -> neg, 1 -> invalid; gold negative: 1 -> pos, 2 -> neg, 1 -> invalid (n = 10)
    golds = ["positive"] * 6 + ["negative"] * 4
    preds = ["positive"] * 4 + ["negative", None] + ["positive", "negative", "negative", None]
    m = compute_metrics(golds, preds)
    assert m["confusion"] == {"positive": {"positive": 4, "negative": 1, "invalid": 1},
                              "negative": {"positive": 1, "negative": 2, "invalid": 1}}
    assert m["n"] == 10 and m["n_valid"] == 8
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["invalid_rate"] == pytest.approx(2 / 10)
    assert m["valid_accuracy"] == pytest.approx(6 / 8)
    pos, neg = m["per_class"]["positive"], m["per_class"]["negative"]
    assert (pos["precision"], pos["recall"], pos["support"]) == pytest.approx((4 / 5, 4 / 6, 6))
    assert (neg["precision"], neg["recall"], neg["support"]) == pytest.approx((2 / 3, 2 / 4, 4))
    f1_pos, f1_neg = 2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6), 2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2)
    assert (pos["f1"], neg["f1"]) == pytest.approx((f1_pos, f1_neg))                 # 0.7273, 0.5714
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert m["majority_label"] == "positive" and m["majority_baseline"] == pytest.approx(0.6)
    lo, hi = m["accuracy_ci95"]
    assert (lo, hi) == pytest.approx((0.3127, 0.8318), abs=1e-4)   # Wilson, k = 6, n = 10 (textbook value)


def test_metrics_edges():
    m = compute_metrics(["negative", "negative", "positive"], [None] * 3)
    assert m["accuracy"] == 0 and m["invalid_rate"] == 1 and m["valid_accuracy"] == 0.0    # no valid answers
    assert m["per_class"]["positive"]["precision"] == 0.0 and m["macro_f1"] == 0.0         # 0/0 counts as 0
    assert m["majority_label"] == "negative" and m["majority_baseline"] == pytest.approx(2 / 3)
    perfect = compute_metrics(["positive", "negative"], ["positive", "negative"])
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["balanced_accuracy"] == 1.0
    with pytest.raises(ValueError):
        compute_metrics(["positive"], ["positive", "negative"])
    with pytest.raises(ValueError):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="neutral"):
        compute_metrics(["neutral"], ["positive"])


def test_wilson_interval():
    lo, hi = wilson_interval(953, 1000)
    assert lo < 0.953 < hi and hi - lo == pytest.approx(0.0265, abs=5e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(20, 20)
    assert lo == pytest.approx(20 / (20 + 1.959963984540054 ** 2))   # closed form at p = 1
    assert not any(math.isnan(x) for x in wilson_interval(0, 0))
