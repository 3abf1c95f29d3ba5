"""The tokenizer wrapper on a real GPT-NeoX-family tokenizer.json: Japanese reviews round-trip, the special ids are
OpenCALM's (eos 0, pad 1), no BOS is added, batch encoding equals one-by-one, and a missing file is named."""
from __future__ import annotations

import json
import re
import unicodedata

import pytest

from conftest import NEOX_TOKENIZER, REVIEWS, need
from minicalm import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(need(NEOX_TOKENIZER))


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    with open(need(REVIEWS / "valid.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["sentence"] for _, line in zip(range(50), f)]
    assert len(texts) == 50
    return texts


def test_japanese_reviews_round_trip(tok, reviews):
    for text in reviews:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert unicodedata.is_normalized("NFC", text)   # the tokenizer NFC-normalizes; these reviews already are
        assert tok.decode(ids) == text


def test_special_ids_and_no_bos(tok):
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    ids = tok.encode("hello")
    assert ids[0] != 0 and 0 not in ids
    assert tok.encode("<|endoftext|>") == [0]               # the eos string is one token
    assert tok.decode([*ids, 0, 1]) == "hello"               # special tokens are skipped when decoding
    assert tok.decode([*ids, 0], skip_special_tokens=False) == "hello<|endoftext|>"


def test_encode_batch_equals_encode(tok, reviews):
    texts = reviews[:20] + ["", "hello", "### Response:\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_folder_and_file_paths_load_the_same(tok):
    by_folder = load_tokenizer(NEOX_TOKENIZER.parent)
    assert by_folder.encode("ポジティブ") == tok.encode("ポジティブ")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)                              # a folder without tokenizer.json
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.json"))):
        Tokenizer(tmp_path / "none.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(bad)
