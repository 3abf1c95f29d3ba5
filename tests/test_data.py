"""minicalm.tasks.data against the real review files and GPT-NeoX tokenizer, plus small files written here for bad
input."""
from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import NEOX_TOKENIZER, REVIEWS, need
from minicalm import load_tokenizer
from minicalm.loss import IGNORE_INDEX
from minicalm.tasks.data import (Example, PromptEncoder, Row, collate, encode_rows, length_batches, pack_texts,
                                 parquet_to_jsonl, read_jsonl)
from minicalm.tasks.task import MARC_JA

PREFIX, TAIL = MARC_JA.prefix, MARC_JA.segments[1][0]   # the post's prompt around the review


def review(text: str, label: str = "positive", id_: str = "x") -> Row:
    return Row({"sentence": text}, label, id_)


def format_prompt(text: str) -> str:
    return MARC_JA.format({"sentence": text})

# The post's prompt, written out by hand: header, blank line, instruction, blank line, input, blank line, response.
EXPECTED_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
この文章は、「ポジティブ」ですか?「ネガティブ」ですか?「ポジティブ」か「ネガティブ」のどちらかを書いて。

### Input:
とても良い商品でした。

### Response:
"""


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(need(NEOX_TOKENIZER))


@pytest.fixture(scope="module")
def valid():
    return read_jsonl(need(REVIEWS / "valid.jsonl"))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- prompt

def test_prompt_layout_matches_facts():
    assert format_prompt("とても良い商品でした。") == EXPECTED_PROMPT
    assert PREFIX + "X" + TAIL == format_prompt("X") and MARC_JA.fields == ["sentence"]
    assert TAIL == "\n\n### Response:\n"
    assert MARC_JA.labels == {"positive": "ポジティブ", "negative": "ネガティブ"}


# ----------------------------------------------------------------------------- reading

def test_read_real_files(valid):
    assert len(valid) == 1000 and sum(r.label == "positive" for r in valid) == 630
    assert valid[0].label == "negative" and valid[0].id == "darkmap-00000" and valid[0].fields["sentence"]
    train = read_jsonl(REVIEWS / "train.jsonl")
    assert len(train) == 10368 and sum(r.label == "positive" for r in train) == 6630
    assert read_jsonl(REVIEWS / "valid.jsonl", limit=5) == valid[:5]


def test_read_int_labels_and_blank_lines(tmp_path):
    path = write(tmp_path, "ok.jsonl", '{"sentence": "良い", "label": 0, "review_id": "a"}\n\n   \n'
                                       '{"sentence": "悪い", "label": 1, "review_id": 7}\n'
                                       '{"sentence": "普通", "label": "negative", "review_id": "c"}')
    assert read_jsonl(path) == [review("良い", "positive", "a"), review("悪い", "negative", "7"),
                                review("普通", "negative", "c")]


GOOD = '{"sentence": "良い", "label": "positive", "review_id": "a"}\n'


@pytest.mark.parametrize("line3, why", [
    ('{"sentence": "x", "label": "positive", "review_id": "c"', "JSON"),   # cut off
    ('{"sentence": "x", "review_id": "c"}', "no label field 'label'"),
    ('{"text": "x", "label": "positive", "review_id": "c"}', "no field 'sentence'"),
    ('["x", "positive", "c"]', "fields"),
    ('{"sentence": 3, "label": "positive", "review_id": "c"}', "string"),
    ('{"sentence": "x", "label": "neutral", "review_id": "c"}', "neutral"),
    ('{"sentence": "x", "label": 2, "review_id": "c"}', "label 2"),
    ('{"sentence": "x", "label": true, "review_id": "c"}', "label True"),
])
def test_bad_line_names_file_and_line(tmp_path, line3, why):
    path = write(tmp_path, "bad.jsonl", GOOD + GOOD + line3 + "\n" + GOOD)
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: ") as e:
        read_jsonl(path)
    assert why in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    for text in ("", "\n  \n"):
        with pytest.raises(ValueError, match="empty.jsonl: no rows"):
            read_jsonl(write(tmp_path, "empty.jsonl", text))


# ----------------------------------------------------------------------------- Parquet and the hub

def write_parquet(path, labels):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    n = len(labels)
    pq.write_table(pa.table({"sentence": [f"レビュー{i}" for i in range(n)], "label": labels,
                             "review_id": [f"R{i}" for i in range(n)]}), path)
    return path


def test_parquet_to_jsonl(tmp_path):
    src = write_parquet(tmp_path / "v.parquet", [0, 1, 0, 0])
    counts = parquet_to_jsonl(src, tmp_path / "out" / "v.jsonl")
    assert counts == {"rows": 4, "positive": 3, "negative": 1}
    assert read_jsonl(tmp_path / "out" / "v.jsonl") == [
        review("レビュー0", "positive", "R0"), review("レビュー1", "negative", "R1"),
        review("レビュー2", "positive", "R2"), review("レビュー3", "positive", "R3")]
    assert "レビュー0" in (tmp_path / "out" / "v.jsonl").read_text(encoding="utf-8")   # not \\u-escaped
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v.jsonl"]              # no temporary left
    with pytest.raises(ValueError, match="row 1"):
        parquet_to_jsonl(write_parquet(tmp_path / "bad.parquet", [0, 5]), tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------- encoding

def test_segments_and_round_trip(tok):
    enc = PromptEncoder(tok, max_len=256)
    text = "とても良い商品でした。"
    assert enc.prefix_ids == tok.encode(PREFIX)
    assert enc.answer_ids == {k: tok.encode(w) for k, w in MARC_JA.labels.items()}   # no eos here
    prompt, truncated = enc.encode_prompt(review(text))
    assert not truncated and prompt == enc.prefix_ids + tok.encode(text) + tok.encode(TAIL)
    assert tok.decode(prompt, skip_special_tokens=False) == format_prompt(text)
    ids, labels, truncated = enc.encode_example(review(text, "negative"))
    assert not truncated and ids[: len(prompt)] == prompt
    assert tok.decode(ids, skip_special_tokens=False) == format_prompt(text) + "ネガティブ<|endoftext|>"
    assert enc.encode_prompts([review(text), review("悪い")]) == [enc.encode_prompt(review(text)),
                                                                   enc.encode_prompt(review("悪い"))]


def test_label_masking_by_hand():
    class Chars:   # one token per character, eos 0: an example small enough to write out
        eos_token_id = 0

        def encode(self, text):
            return [ord(c) for c in text]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    enc = PromptEncoder(Chars(), max_len=len(PREFIX) + len(TAIL) + 5 + 1 + 3)   # room for 3 review chars
    P, Tl = [ord(c) for c in PREFIX], [ord(c) for c in TAIL]
    word = [ord(c) for c in "ポジティブ"]
    ids, labels, truncated = enc.encode_example(review("良い"))
    assert not truncated and not enc.encode_example(review("良い品"))[2]   # 3 chars: exactly fits
    assert ids == P + [ord("良"), ord("い")] + Tl + word + [0]
    assert labels == [IGNORE_INDEX] * (len(P) + 2 + len(Tl)) + word + [0]       # only answer + eos
    ids_all, labels_all, _ = enc.encode_example(review("良い"), train_on_inputs=True)
    assert ids_all == ids and labels_all == ids                                 # the whole sequence
    ids, labels, truncated = enc.encode_example(review("あいうえお", "negative"))   # 5 chars, room for 3
    assert truncated and ids == P + [ord(c) for c in "あいう"] + Tl + [ord(c) for c in "ネガティブ"] + [0]
    assert len(ids) == enc.max_len
    with pytest.raises(ValueError, match="neutral"):
        enc.encode_example(review("良い", "neutral"))
    with pytest.raises(ValueError, match="no room for the rows' text"):
        PromptEncoder(Chars(), max_len=len(PREFIX) + len(TAIL) + 6)


def test_truncation_keeps_prefix_tail_answer(tok, valid):
    enc = PromptEncoder(tok, max_len=192)
    long_review = max(valid, key=lambda r: len(r.fields["sentence"])).fields["sentence"]
    full, tail_ids = tok.encode(long_review), enc.literal_ids[1]
    for label in ("positive", "negative"):
        ids, labels, truncated = enc.encode_example(review(long_review, label))
        answer = enc.answer_ids[label] + [tok.eos_token_id]
        assert truncated and len(ids) <= 192
        assert ids[: len(enc.prefix_ids)] == enc.prefix_ids                          # instruction intact
        assert ids[-len(answer):] == answer and labels[-len(answer):] == answer       # answer + eos intact
        tail_at = len(ids) - len(answer) - len(tail_ids)
        assert ids[tail_at: len(ids) - len(answer)] == tail_ids                       # tail intact
        assert ids[len(enc.prefix_ids): tail_at] == full[: enc.field_budget]          # the review's end is cut
    prompt, truncated = enc.encode_prompt(review(long_review))
    assert truncated and prompt == ids[: -len(answer)]   # evaluation's prompt is training's prompt


def test_encode_rows_real(tok, valid):
    enc = PromptEncoder(tok, max_len=256)
    t = time.perf_counter()
    examples, n_truncated = encode_rows(enc, valid)
    took = time.perf_counter() - t
    assert len(examples) == 1000 and all(len(e.input_ids) <= 256 for e in examples)
    singles = [enc.encode_example(r) for r in valid]
    assert n_truncated == sum(s[2] for s in singles) > 0
    assert [(e.input_ids, e.labels) for e in examples] == [s[:2] for s in singles]   # batch == one by one
    print(f"\nencode_rows: 1000 reviews in {took:.2f}s, {n_truncated} truncated at 256 NeoX tokens")
    on_inputs, _ = encode_rows(enc, valid[:3], train_on_inputs=True)
    assert all(e.labels == e.input_ids for e in on_inputs)


# ----------------------------------------------------------------------------- batching

def test_collate_pads_right_and_masks_padding():
    a, b = Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])
    ids, labels = collate([a, b], pad_id=1)
    assert ids.dtype == labels.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_length_batches(tok, valid):
    lengths = [len(r) for r in tok.encode_batch([r.fields["sentence"] for r in valid])]
    batches = length_batches(lengths, batch_size=8, seed=3)
    assert batches == length_batches(lengths, batch_size=8, seed=3)      # deterministic
    assert batches != length_batches(lengths, batch_size=8, seed=4)
    assert sorted(i for b in batches for i in b) == list(range(1000))               # each index once
    assert sorted(map(len, batches)) == [8] * 125
    odd = length_batches(list(range(21)), batch_size=4, seed=0, window=2)
    assert sorted(map(len, odd)) == [1, 4, 4, 4, 4, 4] and sorted(i for b in odd for i in b) == list(range(21))

    def padding(bs):   # share of padded slots in the (B, T) tensors
        return 1 - sum(lengths[i] for b in bs for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in bs)

    order = list(range(1000))
    random.Random(3).shuffle(order)
    plain = padding([order[k:k + 8] for k in range(0, 1000, 8)])
    grouped = padding(batches)
    print(f"\npadding fraction, batch 8, untruncated NeoX lengths: {grouped:.1%} length-grouped (window 64) "
          f"vs {plain:.1%} random")
    assert grouped < 0.05 and plain > 0.4   # measured: 3.4% against 59%


def test_pack_texts(tok):
    texts = ["Hello world.", "良い商品", "x" * 50]
    flat = [t for s in texts for t in tok.encode(s) + [tok.eos_token_id]]
    blocks = pack_texts(tok, texts, block_size=8)
    assert blocks.shape == (len(flat) // 8, 8) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == flat[: blocks.numel()]
    assert (blocks == tok.eos_token_id).sum() >= 2
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(tok, ["hi"], block_size=1000)
