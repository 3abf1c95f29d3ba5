"""Tasks (minicalm.tasks.task) end to end: task files and their validation, rows with any fields, labels as names or
ints, ids optional; prompts of several fields truncated longest first; the answer rule and the metrics for N
labels; likelihood scoring over N multi-token words against transformers; train_lora.py and eval.py with --task,
the run's task.json reused by eval.py; the README's three-class example files."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import NEOX_TOKENIZER, REVIEWS, ROOT, assert_close_to_scale, hf_tiny, need
from minicalm import load_tokenizer
from minicalm.tasks.data import PromptEncoder, Row, read_jsonl
from minicalm.tools.evaluate import evaluate_rows
from minicalm.loss import shared_prefix_len
from minicalm.tasks.score import compute_metrics, parse_answer
from minicalm.tasks.task import JNLI, MARC_JA, POST_HEADER, Task, load_task

THREE = {"name": "amazon-ja-3",
         "prompt": POST_HEADER + "この文章は、「ポジティブ」「ニュートラル」「ネガティブ」のどれですか?どれか一つを書いて。"
                               "\n\n### Input:\n{text}\n\n### Response:\n",
         "labels": {"positive": "ポジティブ", "neutral": "ニュートラル", "negative": "ネガティブ"}}


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj, ensure_ascii=False) if not isinstance(obj, str) else obj, encoding="utf-8")
    return str(path)


def write_rows(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


class Chars:   # one token per character, eos 0: encodings small enough to write out by hand
    eos_token_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


# ----------------------------------------------------------------------------- task files

def test_builtin_and_file_tasks(tmp_path):
    assert load_task("marc-ja") is MARC_JA and MARC_JA.fields == ["sentence"] and MARC_JA.id_field == "review_id"
    assert load_task("jnli") is JNLI and JNLI.fields == ["sentence1", "sentence2"] and len(JNLI.labels) == 3
    assert JNLI.prefix.endswith("### Input:\n前提: ")   # the text before the first field is the shared prefix
    task = load_task(write_json(tmp_path / "three.json", THREE))
    assert (task.name, task.fields, list(task.labels), task.label_field, task.id_field) == (
        "amazon-ja-3", ["text"], ["positive", "neutral", "negative"], "label", None)
    assert task.prefix == THREE["prompt"].split("{text}")[0] and task.to_dict() == THREE | {"label_field": "label",
                                                                                            "id_field": None}
    assert task.format({"text": "良い"}) == THREE["prompt"].replace("{text}", "良い")
    braces = load_task(write_json(tmp_path / "b.json", THREE | {"prompt": "{{literal}} {text}:"}))
    assert braces.fields == ["text"] and braces.format({"text": "x"}) == "{literal} x:"


def test_a_builtin_task_written_as_a_file_keeps_its_data_source(tmp_path):
    """task.json beside an adapter is the task as a file: for a built-in task, its hub data comes along (the bug of
    `eval.py --adapter`: the file dropped it, and evaluation found no data to read)."""
    for builtin in (MARC_JA, JNLI):
        again = load_task(write_json(tmp_path / f"{builtin.name}.json", builtin.to_dict()))
        assert again.to_dict() == builtin.to_dict() and again.hub == builtin.hub and again.hub["files"]["validation"]
    with pytest.raises(ValueError, match="hub must be"):
        load_task(write_json(tmp_path / "h.json", THREE | {"hub": {"repo": "owner/name"}}))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"name": "t", "labels": THREE["labels"]}, "at least name, prompt and labels"),
    (THREE | {"label_feild": "y"}, "unknown key 'label_feild'"),
    (THREE | {"prompt": "### Response:\n"}, "the prompt has no field"),
    (THREE | {"prompt": "{text"}, "not a valid template"),
    (THREE | {"prompt": "{0} and {}"}, "prompt fields must be distinct names"),
    (THREE | {"prompt": "{a} {a}"}, "prompt fields must be distinct names"),
    (THREE | {"labels": {"positive": "ポジティブ"}}, "at least two labels"),
    (THREE | {"labels": ["positive", "negative"]}, "at least two labels"),
    (THREE | {"labels": {"a": "同じ", "b": "同じ"}}, "labels 'a' and 'b' have the same answer word '同じ'"),
    (THREE | {"labels": {"a": "x", "b": ""}}, "non-empty answer words"),
    (THREE | {"prompt": "{text:>99999999}"}, "prompt field {text:>99999999} takes no format spec or conversion; "
                                             "write {text}"),
    (THREE | {"prompt": "x {text!r}"}, "prompt field {text!r} takes no format spec"),
    (THREE | {"labels": {"a": "良い\n悪い", "b": "y"}}, "label 'a''s answer word '良い\\n悪い' holds a line break"),
    (THREE | {"prompt": "{text} ({label})"}, "the prompt shows {label}, the field that holds the answer; a prompt asks "
                                             "for it and must not contain it"),
    ({"name": "qa", "prompt": "Q: {question} A: {answer}\n", "answer_field": "answer"}, "the prompt shows {answer}"),
])
def test_bad_task_file_gets_one_clear_line(tmp_path, content, message):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(ValueError) as e:
        load_task(path)
    assert message in str(e.value) and str(e.value).startswith(path) and "\n" not in str(e.value)


def test_unknown_task_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: neither a built-in task .*marc-ja, jnli.* nor a task"):
        load_task(tmp_path / "nope.json")


def test_answer_words_whose_tokens_are_a_prefix_are_refused():
    tok = load_tokenizer(need(NEOX_TOKENIZER))
    assert tok.encode("yes!")[: len(tok.encode("yes"))] == tok.encode("yes")   # what makes them ambiguous
    task = Task("yn", "Q: {text}\nA:", {"yes": "yes", "emphatic": "yes!", "no": "no"}, source="yn.json")
    with pytest.raises(ValueError, match=r"yn\.json: task 'yn': the answer word of 'yes' \('yes'\) is, in tokens, "
                                         r"a prefix of that of 'emphatic'"):
        PromptEncoder(tok, 64, task)


# ----------------------------------------------------------------------------- rows

def test_rows_with_other_fields_int_labels_and_no_ids(tmp_path):
    task = load_task(write_json(tmp_path / "t.json", THREE | {"label_field": "y", "id_field": "id"}))
    path = write_rows(tmp_path / "rows.jsonl", [{"text": "良い", "y": "positive", "id": "a"}, "",
                                               {"text": "普通", "y": 1}, {"text": "悪い", "y": 2, "extra": 3}])
    assert read_jsonl(path, task) == [Row({"text": "良い"}, "positive", "a"), Row({"text": "普通"}, "neutral", "3"),
                                      Row({"text": "悪い"}, "negative", "4")]   # no id: the line number


@pytest.mark.parametrize("row, message", [
    ({"sentence1": "猫がいる", "label": "neutral"}, "no field 'sentence2', which task jnli's prompt uses"),
    ({"sentence1": "猫", "sentence2": "犬", "label": "mixed"}, "unknown label 'mixed' (task jnli expects 'entailment', "
                                                              "'contradiction', 'neutral' or 0..2)"),
    ({"sentence1": "猫", "sentence2": "犬", "label": 3}, "unknown label 3 (task jnli expects 'entailment', "
                                                          "'contradiction', 'neutral' or 0..2)"),
    ({"sentence1": "猫", "sentence2": "犬"}, "no label field 'label'"),
    ({"sentence1": "猫", "sentence2": ["犬"], "label": 0}, "sentence2 is list, not a string"),
])
def test_bad_row_names_file_line_and_field(tmp_path, row, message):
    good = {"sentence1": "猫", "sentence2": "動物", "label": 0}
    path = write_rows(tmp_path / "pairs.jsonl", [good, "", row])
    with pytest.raises(ValueError) as e:
        read_jsonl(path, JNLI)
    assert str(e.value) == f"{path}:3: {message}"


def test_two_fields_are_cut_longest_first_and_share_the_prefix():
    task = Task("pair", "H:{a}|{b}.", {"x": "X", "y": "Y"})
    enc = PromptEncoder(Chars(), max_len=len("H:|.") + 1 + 1 + 6, task=task)   # room for 6 field characters
    ids = lambda s: [ord(c) for c in s]
    assert enc.prefix_ids == ids("H:") and enc.field_budget == 6
    cases = [("ab", "cd", "ab", "cd"),              # fits
             ("abcdefgh", "xy", "abcd", "xy"),      # the long field alone is cut
             ("abcdefgh", "uvwxyz", "abc", "uvw"),  # both down to the same length
             ("abcde", "uvwxyz", "abc", "uvw")]
    for a, b, kept_a, kept_b in cases:
        prompt, truncated = enc.encode_prompt(Row({"a": a, "b": b}, "x", "0"))
        assert prompt == ids(f"H:{kept_a}|{kept_b}.") and truncated == ((a, b) != (kept_a, kept_b))
    # training shares the prefix (and more when rows agree further): every row starts with the same ids
    rows = [Row({"a": a, "b": "q"}, "x", "0") for a in ("k1", "k2", "j")]
    x = torch.tensor([enc.encode_example(r)[0] + [1] * (3 - len(r.fields["a"])) for r in rows])
    assert shared_prefix_len(x) == len(enc.prefix_ids)


# ----------------------------------------------------------------------------- answers and metrics for N labels

WORDS = {"neutral": "中立", "weak": "中立的", "contradiction": "矛盾"}   # one word inside another


@pytest.mark.parametrize("text, expected", [
    ("中立", "neutral"), ("中立的です", "weak"), ("「矛盾」", "contradiction"), ("\n 中立。", "neutral"),
    ("中立的で矛盾", None), ("中立と矛盾", None), ("矛盾\n中立", "contradiction"), ("含意", None), ("", None),
])
def test_parse_answer_with_n_words(text, expected):
    assert parse_answer(text, WORDS) == expected


def test_metrics_for_three_labels_against_hand_counts():
    labels = ["a", "b", "c"]
    golds = ["a"] * 4 + ["b"] * 3 + ["c"] * 3
    preds = ["a", "a", "b", None] + ["b", "b", "c"] + ["c", None, "a"]
    m = compute_metrics(golds, preds, labels)
    assert m["confusion"] == {"a": {"a": 2, "b": 1, "c": 0, "invalid": 1}, "b": {"a": 0, "b": 2, "c": 1, "invalid": 0},
                              "c": {"a": 1, "b": 0, "c": 1, "invalid": 1}}
    assert (m["accuracy"], m["invalid_rate"], m["valid_accuracy"]) == pytest.approx((5 / 10, 2 / 10, 5 / 8))
    recall, precision = {"a": 2 / 4, "b": 2 / 3, "c": 1 / 3}, {"a": 2 / 3, "b": 2 / 3, "c": 1 / 2}
    f1 = {k: 2 * precision[k] * recall[k] / (precision[k] + recall[k]) for k in labels}
    for k in labels:
        assert (m["per_class"][k]["recall"], m["per_class"][k]["precision"], m["per_class"][k]["f1"]) == \
            pytest.approx((recall[k], precision[k], f1[k]))
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["balanced_accuracy"] == pytest.approx(sum(recall.values()) / 3)
    assert (m["majority_label"], m["majority_baseline"]) == ("a", pytest.approx(0.4))


def test_likelihood_over_three_multi_token_words_matches_transformers(tmp_path):
    """JNLI's three answer words (several byte tokens each with the GPT-NeoX tokenizer) scored from the cache, for
    pairs of real review sentences, equal transformers' summed log-probabilities."""
    tok = load_tokenizer(need(NEOX_TOKENIZER))
    folder, hf = hf_tiny(tmp_path, vocab_size=50304, max_position_embeddings=512)
    from minicalm import load_model
    model = load_model(folder, dtype=torch.float32)
    texts = [r.text[:40] for r in read_jsonl(need(REVIEWS / "valid.jsonl"), limit=6)]
    rows = [Row({"sentence1": a, "sentence2": b}, label, str(i))
            for i, (a, b, label) in enumerate(zip(texts, texts[1:], ["entailment", "contradiction", "neutral"] * 2))]
    enc = PromptEncoder(tok, 512, JNLI)
    assert all(len(w) > 1 for w in enc.answer_ids.values())
    out = evaluate_rows(model, tok, rows, JNLI, max_len=512, batch_size=2, mode="likelihood", log=False)
    prompts = [ids for ids, _ in enc.encode_prompts(rows)]
    with torch.no_grad():
        want = []
        for p in prompts:
            row = []
            for label in JNLI.labels:
                a = enc.answer_ids[label]
                logp = hf(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
                row.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a)))
            want.append(row)
    got = torch.tensor([[p[f"logprob_{label}"] for label in JNLI.labels] for p in out["predictions"]])
    assert_close_to_scale(got, torch.tensor(want, dtype=torch.float32))
    m = out["metrics"]
    assert set(m["confusion"]) == set(JNLI.labels) and all(len(r) == 4 for r in m["confusion"].values())


# ----------------------------------------------------------------------------- the scripts

def three_class_files(tmp_path, monkeypatch) -> tuple[str, str, str]:
    """The README's example: run its code block, which writes amazon-ja-3.json, train3.jsonl and validation3.jsonl,
    here from the shared reviews (MARC-ja's format) in place of MARC-ja's splits from the hub."""
    from minicalm.tasks import data

    code = re.search(r"## Your own task.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    assert "data.task_data(MARC_JA, split)" in code
    files = {"train": need(REVIEWS / "train.jsonl"), "validation": need(REVIEWS / "valid.jsonl")}
    monkeypatch.setattr(data, "task_data", lambda task, split: files[split])
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    return str(tmp_path / "amazon-ja-3.json"), str(tmp_path / "train3.jsonl"), str(tmp_path / "validation3.jsonl")


def test_readme_three_class_files(tmp_path, monkeypatch):
    task_file, train, valid = three_class_files(tmp_path, monkeypatch)
    task = load_task(task_file)
    assert task.name == "amazon-ja-3" and list(task.labels) == ["positive", "neutral", "negative"]
    for path, n in ((train, 1200), (valid, 120)):
        rows = read_jsonl(path, task)
        assert [sum(r.label == k for r in rows) for k in task.labels] == [n, n, n]   # balanced
        assert [r.id for r in rows[:3]] == ["1", "2", "3"]                          # no ids: line numbers
        raw = json.loads(open(path, encoding="utf-8").readline())
        assert set(raw) == {"text", "label"}
    neutral = [r.text for r in read_jsonl(valid, task) if r.label == "neutral"]
    assert all(t.count("。") >= 2 for t in neutral)   # a praise and a complaint, one sentence each


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_train_and_eval_with_a_task_file(base, tmp_path, monkeypatch):
    """train_lora.py --task FILE on three-class rows without ids; eval.py on its adapter asks the same question
    without being told (the run's task.json), and reports three classes (no post rows: another task)."""
    folder, _ = base
    task_file, train, valid = three_class_files(tmp_path, monkeypatch)
    out = tmp_path / "run"
    res = run("train_lora.py", "--model", folder, "--task", task_file, "--train-file", train, "--valid-file", valid,
              "--out", out, "--limit-train", 32, "--eval-limit", 16, "--batch-size", 8, "--micro-batch-size", 8,
              "--max-len", 160, "--max-steps", 3, "--warmup-steps", 1, "--device", "cpu", "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    for where in (out, out / "adapter"):
        assert json.loads((where / "task.json").read_text(encoding="utf-8")) == load_task(task_file).to_dict()
    assert json.loads((out / "train_config.json").read_text())["task"] == task_file
    ev = run("eval.py", "--model", folder, "--adapter", out / "adapter", "--compare-base", "--data", valid, "--limit",
             12, "--max-len", 160, "--mode", "both", "--device", "cpu", "--out", tmp_path / "eval")
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["task"]["name"] == "amazon-ja-3" and metrics["n_rows"] == 12
    for run_ in ("base", "adapter"):
        for mode in ("generate", "likelihood"):
            c = metrics[run_][mode]["confusion"]
            assert list(c) == ["positive", "neutral", "negative"] and all(list(r)[-1] == "invalid" for r in c.values())
    preds = [json.loads(ln) for ln in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and all(p["answer"] in (None, *THREE["labels"]) and p["gold"] for p in preds)
    report = (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")
    assert "task amazon-ja-3" in report and "(post)" not in report and "| neutral |" in report

    bad = run("train_lora.py", "--model", folder, "--task", write_json(tmp_path / "one.json", THREE | {
        "labels": {"positive": "ポジティブ"}}), "--train-file", train, "--out", tmp_path / "x", "--device", "cpu")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"train_lora.py: error: {tmp_path / 'one.json'}: task 'amazon-ja-3': a task needs " \
                                 f"at least two labels (name -> answer word), got {{'positive': 'ポジティブ'}}"
    assert not (tmp_path / "x").exists()
