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


# ----------------------------------------------------------------------------- llm-jp-eval's metrics, against oracles

def review_pieces(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Pairs of real review fragments (punctuation, full-width letters, Latin words, spaces), a third of them the
    same tokens in another order or with 。 replaced by spaces: where a token-sort ratio differs from a plain one."""
    import json
    import random

    from conftest import REVIEWS, need
    with open(need(REVIEWS / "valid.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["sentence"] for line, _ in zip(f, range(300))]
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = (t[rng.randrange(len(t)):][:rng.randrange(1, 80)] for t in (rng.choice(texts), rng.choice(texts)))
        if rng.random() < 0.3:
            b = a[::-1] if rng.random() < 0.5 else " ".join(reversed(a.split("。")))
        out.append((a, b))
    return out


def test_token_sort_ratio_is_thefuzz_s_on_real_text():
    from thefuzz import fuzz

    from minicalm.tasks.score import token_sort_ratio
    pairs = review_pieces(3000) + [("", ""), ("。", "、"), ("a", ""), ("東京 大阪", "大阪　東京"), ("ＡＢＣ", "abc"),
                                   ("café", "caf"), ("x_y", "x y"), ("4.5", "4 5")]
    got = [round(100 * token_sort_ratio(a, b)) for a, b in pairs]
    assert got == [fuzz.token_sort_ratio(a, b) for a, b in pairs]
    assert token_sort_ratio("東京 大阪", "大阪 東京") == 1.0 and token_sort_ratio("", "") == 1.0   # order, then none left


def test_lcs_length_against_dynamic_programming():
    import random

    from minicalm.tasks.score import lcs_length

    def dp(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            prev = 0
            for j, y in enumerate(b):
                prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
        return row[-1]

    rng = random.Random(0)
    for _ in range(500):
        a, b = ("".join(rng.choice("あいうab") for _ in range(rng.randrange(0, 40))) for _ in range(2))
        assert lcs_length(a, b) == dp(a, b), (a, b)


@pytest.mark.parametrize("text, number", [
    ("3.2", 3.2), ("類似度は4.0です", 4.0), ("４．５", 4.5), ("1.", 1.0), (".5", 0.5), (" 5 ", 5.0),
    ("-1.5", 1.5),          # the sign is removed with everything else but digits and "."
    ("", None), ("なし", None), ("1.2.3", None), (".", None),
])
def test_answers_read_as_numbers_by_llm_jp_eval_s_rule(text, number):
    import re
    import unicodedata

    from minicalm.tasks.score import llm_jp_float
    assert llm_jp_float(text) == number

    def theirs(s):   # llm-jp-eval's parse_float after its NFKC normalize, as its evaluator applies them
        try:
            return float(re.sub(r"[^0-9.]", "", unicodedata.normalize("NFKC", s)))
        except ValueError:
            return -2.0
    assert theirs(text) == (-2.0 if number is None else number)


def test_pearson_and_spearman_are_scipy_s_with_nan_as_zero():
    import random

    from scipy.stats import pearsonr, spearmanr

    from minicalm.tasks.score import pearson, ranks, spearman
    rng = random.Random(0)
    for n in (2, 3, 10, 200):
        gold = [rng.choice([0.0, 0.2, 1.4, 2.0, 3.8, 5.0]) for _ in range(n)]   # JSTS's steps: many ties
        guess = [rng.choice([-2.0, 0.0, 1.0, 2.5, 5.0]) if rng.random() < 0.5 else g for g in gold]
        if len(set(gold)) > 1 and len(set(guess)) > 1:
            assert pearson(gold, guess) == pytest.approx(pearsonr(gold, guess)[0], abs=1e-12)
            assert spearman(gold, guess) == pytest.approx(spearmanr(gold, guess)[0], abs=1e-12)
    from scipy.stats import rankdata
    values = [3.0, 1.0, 3.0, 2.0, 3.0, 1.0]
    assert ranks(values) == list(rankdata(values))   # ties share the mean of their ranks
    assert pearson([1.0, 2.0, 3.0], [-2.0, -2.0, -2.0]) == 0.0 == spearman([1, 2, 3], [4, 4, 4])   # NaN -> 0
    assert pearson([1.0], [2.0]) == 0.0


def test_set_f1_and_text_metrics_by_hand():
    from minicalm.tasks.score import set_f1, text_metrics
    assert set_f1("a\nb\nb", "a\nc") == pytest.approx(2 * 0.5 * 0.5 / 1.0)   # {a, b} vs [a, c]: p 1/2, r 1/2
    assert set_f1("a", "a\nb") == pytest.approx(2 * 1 * 0.5 / 1.5) and set_f1("x", "y") == 0.0
    m = text_metrics([["3.2"], ["1.0"], ["4.8"], ["0.0"]], ["3.0", "わからない", "4.8", "0.2"],
                     ["pearson", "spearman", "token_sort_ratio"])
    from scipy.stats import pearsonr, spearmanr
    gold, read = [3.2, 1.0, 4.8, 0.0], [3.0, -2.0, 4.8, 0.2]   # the unparsable answer counts as -2.0
    assert m["n_unparsable"] == 1 and m["pearson"] == pytest.approx(pearsonr(gold, read)[0])
    assert m["spearman"] == pytest.approx(spearmanr(gold, read)[0])
    assert m["exact_match"] == 0.25 and m["token_sort_ratio"] == pytest.approx((0.67 + 0.0 + 1.0 + 0.67) / 4)


@pytest.mark.parametrize("written, expected", [("不満", 1), ("\n 不満 \n理由は...", 1), ("ＡＢＣ", 2),
                                               ("不満です", None), ("満足\n", 0), ("", None), ("配送料", None)])
def test_a_written_choice_is_its_first_line_matched_after_nfkc(written, expected):
    from minicalm.tasks.score import choice_answer
    assert choice_answer(written, ("満足", "不満", "ABC", "配送")) == expected
