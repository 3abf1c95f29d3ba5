"""Free-form answers: Alpaca-format instruction data (both templates, a column map), answers trained on with the prompt
masked, long inputs cut and rows that cannot fit dropped, greedy answers that stop at EOS or a stop string (the same
tokens as transformers' generate), exact match and character F1 against hand counts, k-shot prompts in the shared
prefix, llm-jp-eval files, and the bad inputs of each, one line apiece.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REVIEWS, ROOT, hf_tiny, need
from minicalm import load_model
from minicalm.loss import IGNORE_INDEX
from minicalm.tasks import data
from minicalm.tasks.score import char_f1, free_answer, normalize, text_metrics
from minicalm.tasks.task import ALPACA, JSQUAD, load_task
from minicalm.tools.evaluate import EvalConfig, evaluate_rows, run_eval
from minicalm.train import TrainConfig, train

MAX_LEN = 160


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def first_sentence(text: str) -> str:
    return text.split("。")[0] + "。" if "。" in text else text


def alpaca_rows(n: int, offset: int = 0) -> list[dict]:
    """Alpaca-format rows from real reviews: every other row with an input (the review: give its first sentence),
    the others without one (the instruction holds the review: answer its label word)."""
    reviews = data.read_jsonl(need(REVIEWS / "train.jsonl"), limit=offset + n)[offset:]
    return [{"instruction": "この文章の最初の文を書いて。", "input": r.fields["sentence"],
             "output": first_sentence(r.fields["sentence"])} if i % 2 == 0 else
            {"instruction": f"次のレビューは肯定的ですか:{r.fields['sentence'][:40]}", "input": "",
             "output": "はい" if r.label == "positive" else "いいえ"} for i, r in enumerate(reviews)]


# ----------------------------------------------------------------------------- the task and its encoding

def test_alpaca_takes_the_template_without_input_for_rows_whose_input_is_empty(base):
    _, tok = base
    full = {"instruction": "要約して。", "input": "長い文章"}
    assert ALPACA.format(full).startswith(ALPACA.prompt[:60]) and "### Input:\n長い文章\n\n### Response:\n" in \
        ALPACA.format(full)
    short = ALPACA.format({"instruction": "挨拶して。", "input": " "})
    assert short == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n挨拶して。\n\n### Response:\n")
    enc = data.PromptEncoder(tok, 2048, ALPACA)   # nothing cut
    rows = [data.parse_row(r, ALPACA, i) for i, r in enumerate(alpaca_rows(4))]
    for row, (ids, _) in zip(rows, enc.encode_prompts(rows)):
        assert tok.decode(ids) == ALPACA.format(row.fields)   # segment by segment = the whole text
        assert ids[:len(enc.prefix_ids)] == enc.prefix_ids     # both templates begin with the shared prefix
    assert tok.decode(enc.prefix_ids) == "Below is an instruction that describes a task"[:len(tok.decode(
        enc.prefix_ids))] and len(enc.prefix_ids) > 3


def test_answer_and_eos_are_scored_the_prompt_masked(base):
    _, tok = base
    enc = data.PromptEncoder(tok, MAX_LEN, ALPACA)
    row = data.parse_row(alpaca_rows(1)[0], ALPACA, 1)
    ids, labels, _ = enc.encode_example(row)
    answer = tok.encode(row.label) + [tok.eos_token_id]
    assert ids[-len(answer):] == answer and labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer


def test_only_the_input_is_cut_and_rows_that_cannot_fit_are_dropped(base, tmp_path, capsys):
    _, tok = base
    long = "とても良い商品でした。" * 40
    rows = [{"instruction": "最初の文は?", "input": long, "output": "とても良い商品でした。"},
            {"instruction": "書き写して。" * 30, "input": "x", "output": "長い答え" * 40}]   # no room, whatever is cut
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    examples = data.read_examples(path, ALPACA, tok, MAX_LEN)
    assert len(examples) == 1 and len(examples[0].input_ids) <= MAX_LEN
    text = tok.decode(examples[0].input_ids)
    assert "### Instruction:\n最初の文は?\n\n### Input:\nとても良い" in text and text.endswith(
        "\n\n### Response:\nとても良い商品でした。")   # the template, the question and the answer whole
    assert f"{path}: 1 of 2 rows truncated to --max-len {MAX_LEN}, 1 dropped" in capsys.readouterr().err


def test_a_column_map_reads_dolly_and_a_task_file_can_change_a_builtin(tmp_path):
    dolly = tmp_path / "dolly-ja.json"
    dolly.write_text(json.dumps({"from": "alpaca", "name": "dolly-ja",
                                 "columns": {"input": "context", "output": "response"}}), encoding="utf-8")
    task = load_task(dolly)
    assert (task.name, task.prompt, task.prompt_no_input) == ("dolly-ja", ALPACA.prompt, ALPACA.prompt_no_input)
    row = data.parse_row({"instruction": "要約して", "context": "文", "response": "答え", "category": "x"}, task, 1)
    assert (row.fields, row.label, row.references) == ({"instruction": "要約して", "input": "文"}, "答え", ("答え",))
    no_context = data.parse_row({"instruction": "挨拶して", "response": "こんにちは"}, task, 2)
    assert no_context.fields["input"] == "" and task.short(no_context.fields)


@pytest.mark.parametrize("row, message", [
    ({"instruction": "a", "input": ""}, ":2: no answer field 'output'"),
    ({"instruction": "a", "input": "", "output": " "}, ":2: empty answer in 'output'"),
    ({"instruction": "a", "input": "", "output": []}, ":2: empty answer in 'output'"),
    ({"input": "b", "output": "c"}, ":2: no field 'instruction', which task alpaca's prompt uses"),
])
def test_bad_free_form_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "a.jsonl", [alpaca_rows(1)[0], row])
    with pytest.raises(ValueError) as e:
        data.read_jsonl(path, ALPACA)
    assert str(e.value) == path + message or str(e.value).startswith(path + message)


# ----------------------------------------------------------------------------- scoring

def test_char_f1_and_exact_match_against_hand_counts():
    assert normalize(" ＡＢＣ１２３ ") == "ABC123" and normalize("ｶﾀｶﾅ") == "カタカナ"
    assert char_f1("東京都", "東京") == pytest.approx(2 * 2 / (3 + 2))   # 2 shared: p 2/3, r 1, F1 0.8
    assert char_f1("ああい", "あい") == pytest.approx(2 * 2 / 5)          # multisets: あ counted once on one side
    assert char_f1("", "") == 1.0 and char_f1("", "x") == 0.0 and char_f1("abc", "xyz") == 0.0
    m = text_metrics([["東京", "東京都"], ["大阪"], ["1848年"]], ["東京都", "", "１８４８年"])
    assert m["exact_match"] == pytest.approx(2 / 3)           # the best reference counts; NFKC makes the digits agree
    assert m["char_f1"] == pytest.approx((1.0 + 0.0 + 1.0) / 3) and m["empty_rate"] == pytest.approx(1 / 3)
    assert free_answer("  答えです\n次の行", ["\n"]) == "答えです" and free_answer("答え###終", ["###"]) == "答え"


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def hf(base, tmp_path_factory):
    """A transformers GPT-NeoX with the base tokenizer's vocabulary, saved with that tokenizer (the oracle)."""
    _, tok = base
    folder, model = hf_tiny(tmp_path_factory.mktemp("ff"), vocab_size=tok.vocab_size, max_position_embeddings=512,
                            initializer_range=0.2, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    (folder / "tokenizer.json").write_bytes(tok.path.read_bytes())
    return folder, model


def test_greedy_answers_are_transformers_tokens_cut_at_the_stop(base, hf):
    """Batched, left-padded, shared prefix: each row's answer is transformers' greedy continuation of its own prompt,
    cut at EOS and at the stop string; with no stop string the rows run to EOS or the budget."""
    _, tok = base
    folder, ref = hf
    model = load_model(folder, dtype=torch.float32)
    rows = [data.parse_row(r, ALPACA, i) for i, r in enumerate(alpaca_rows(6))]
    for stop in (None, ["。"]):
        task = replace(ALPACA, stop=stop, max_new_tokens=12)
        out = evaluate_rows(model, tok, rows, task, batch_size=4, max_len=MAX_LEN, log=False)
        enc = data.PromptEncoder(tok, MAX_LEN, task)
        for (ids, _), p in zip(enc.encode_prompts(rows), out["predictions"]):
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            want = want[:want.index(tok.eos_token_id)] if tok.eos_token_id in want else want
            text = tok.decode(want)
            assert p["answer"] == free_answer(text, stop)
            assert p["continuation"] == text or (stop and p["continuation"].startswith(p["answer"]) and "。" in
                                                 p["continuation"] and text.startswith(p["continuation"]))


def test_decoding_ends_once_every_row_wrote_its_stop_string(base, hf, monkeypatch):
    """No decode step is spent on a batch whose rows are all done: with a stop string that every row writes at once,
    one token each."""
    _, tok = base
    model = load_model(hf[0], dtype=torch.float32)
    rows = [data.parse_row(r, ALPACA, i) for i, r in enumerate(alpaca_rows(4))]
    import minicalm.generate as G
    calls = []
    real = G.decode_one_token
    monkeypatch.setattr(G, "decode_one_token", lambda *a: calls.append(1) or real(*a))
    first = evaluate_rows(model, tok, rows, replace(ALPACA, max_new_tokens=1), batch_size=4, max_len=MAX_LEN,
                          log=False)["predictions"]
    stops = sorted({p["continuation"] for p in first if p["continuation"]})   # what each row writes first
    assert stops and calls == []
    evaluate_rows(model, tok, rows, replace(ALPACA, stop=stops, max_new_tokens=20), batch_size=4, max_len=MAX_LEN,
                  log=False)
    assert calls == [], "decode steps were spent after every row had stopped"
    evaluate_rows(model, tok, rows, replace(ALPACA, max_new_tokens=3), batch_size=4, max_len=MAX_LEN, log=False)
    assert calls, "the check itself: without a stop string the rows go on"


def test_alpaca_format_training_and_evaluation_end_to_end(base, tmp_path):
    """Train on Alpaca-format rows (JSON lines), evaluate free text with --compare-base: metrics.json has exact match,
    char F1 and the answers' loss for both models, predictions.jsonl gold and answer, report.md the table and rows."""
    folder, _ = base
    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(32))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", alpaca_rows(6, offset=100))
    task = tmp_path / "short.json"   # Alpaca with a budget that fits the tiny model's 256 positions
    task.write_text(json.dumps({"from": "alpaca", "name": "alpaca-short", "max_new_tokens": 16}), encoding="utf-8")
    res = train(TrainConfig(model=str(folder), task=str(task), train_file=train_file, valid_file=valid_file,
                            out=str(tmp_path / "run"), max_len=MAX_LEN, batch_size=8, micro_batch_size=8, lr=1e-2,
                            warmup_steps=0, max_steps=3, eval_every=0, eval_accuracy=4, seed=0, device="cpu",
                            dtype="float32", log=False))
    assert res["step"] == 3
    rec = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"val_loss", "val_exact_match", "val_char_f1"} <= rec.keys()
    out = tmp_path / "eval"
    result = run_eval(EvalConfig(adapter=str(tmp_path / "run" / "adapter"), data=valid_file, out=str(out),
                                 max_len=MAX_LEN, max_new_tokens=16, compare_base=True, device="cpu", log=False))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"]["name"] == "alpaca-short"   # the adapter's task.json
    for name in ("base", "adapter"):
        m = metrics[name]
        assert m["n"] == 6 and 0 <= m["exact_match"] <= m["char_f1"] <= 1 and m["answer_loss"] > 0
    assert metrics["adapter"]["answer_loss"] < metrics["base"]["answer_loss"]   # trained on the same kind of answers
    preds = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = alpaca_rows(6, offset=100)
    assert [p["gold"] for p in preds[:6]] == [[r["output"]] for r in rows] and all("answer" in p for p in preds)
    report = result["report"]
    assert "| model | exact match | char F1 | answer loss | empty answers |" in report
    assert f"- gold {rows[0]['output']!r}: " in report and "before fine-tuning" in report and "+ LoRA" in report


# ----------------------------------------------------------------------------- k-shot

def test_shots_are_written_before_each_prompt_in_the_shared_prefix(base, tmp_path):
    _, tok = base
    from minicalm.tasks.task import MARC_JA
    shots = data.read_jsonl(need(REVIEWS / "train.jsonl"), limit=2)
    task = MARC_JA.with_shots(shots)
    row = data.read_jsonl(REVIEWS / "valid.jsonl", limit=1)[0]
    want = "".join(MARC_JA.format(s.fields) + MARC_JA.labels[s.label] + "\n\n" for s in shots) + MARC_JA.format(row.fields)
    assert task.format(row.fields) == want
    enc = data.PromptEncoder(tok, 1024, task)
    assert tok.decode(enc.prefix_ids).startswith(MARC_JA.prefix) and len(enc.prefix_ids) > len(
        data.PromptEncoder(tok, 1024, MARC_JA).prefix_ids) + 20   # both shots are in the prefix computed once


def test_shots_beyond_what_is_available_are_refused_in_one_line(base, tmp_path):
    folder, _ = base
    pool = write_jsonl(tmp_path / "pool.jsonl", [json.dumps(r) for r in alpaca_rows(3)])
    asked = write_jsonl(tmp_path / "asked.jsonl", [json.dumps(r) for r in alpaca_rows(1)])   # also in the pool
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(folder), "--task", "alpaca", "--data",
                          asked, "--shots", "3", "--shots-file", pool, "--device", "cpu", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"eval.py: error: --shots: 3 shots asked, 2 examples available in {pool} (rows being asked excluded)"]


# ----------------------------------------------------------------------------- llm-jp-eval files

def llm_jp_file(path: Path, **changes) -> Path:
    reviews = data.read_jsonl(need(REVIEWS / "valid.jsonl"), limit=8)
    rows = [{"input": r.fields["sentence"][:60], "output": "positive" if r.label == "positive" else "negative"}
            for r in reviews]
    d = {"instruction": "レビューの評価をpositiveかnegativeで答えて。", "output_length": 3,
         "metrics": ["exact_match", "char_f1"], "few_shots": rows[:2], "samples": rows[2:]} | changes
    path.write_text(json.dumps({k: v for k, v in d.items() if v is not None}, ensure_ascii=False), encoding="utf-8")
    return path


def test_an_llm_jp_eval_file_is_evaluated_as_given_and_trained_on(base, tmp_path, capsys):
    folder, _ = base
    path = llm_jp_file(tmp_path / "marc_ja_sample.json")
    task = load_task(path)
    assert (task.name, task.answer_field, task.max_new_tokens, len(task.samples), len(task.few_shots)) == \
        ("marc_ja_sample", "output", 3, 6, 2)
    assert (task.metrics, task.llm_jp_eval_metrics) == (["exact_match", "token_sort_ratio"], ["exact_match", "char_f1"])
    out = run_eval(EvalConfig(model=str(folder), task=str(path), shots=1, out=str(tmp_path / "e"), max_len=250,
                              device="cpu", log=False))
    assert out["metrics"]["n_rows"] == 6 and out["metrics"]["shots"] == 1 and "1-shot" in out["report"]
    m = out["metrics"]["base"]   # the file's metrics again under its own names: its char_f1 is the fuzzy ratio
    assert m["llm_jp_eval"] == {"exact_match": m["exact_match"], "char_f1": m["token_sort_ratio"]}
    res = train(TrainConfig(model=str(folder), task=str(path), out=str(tmp_path / "run"), max_len=MAX_LEN,
                            batch_size=2, micro_batch_size=2, max_steps=2, warmup_steps=0, eval_every=0, seed=0,
                            device="cpu", dtype="float32", log=False))
    assert res["step"] == 2 and res["val_loss"] is not None   # trained and validated on its samples


@pytest.mark.parametrize("changes, message", [
    (dict(samples=None), "an llm-jp-eval file without samples (it holds instruction, output_length, metrics, "
                         "few_shots and samples)"),
    (dict(samples=[]), "an llm-jp-eval file without samples (a list of"),
    (dict(instruction=None), "an llm-jp-eval file without instruction ("),
    (dict(output_length=None, instruction=None), "an llm-jp-eval file without instruction, output_length ("),
    (dict(output_length=0), "output_length must be a positive number of tokens (an answer's budget), got 0"),
    (dict(output_length="3"), "output_length must be a positive number of tokens (an answer's budget), got '3'"),
])
def test_a_bad_llm_jp_eval_file_names_what_is_missing_in_one_line(tmp_path, changes, message):
    path = llm_jp_file(tmp_path / "x.json", **changes)
    with pytest.raises(ValueError) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_an_llm_jp_eval_file_without_few_shots_has_none(tmp_path):
    task = load_task(llm_jp_file(tmp_path / "x.json", few_shots=None, metrics=None))
    assert task.few_shots is None and len(task.samples) == 6 and task.max_new_tokens == 3


def test_a_prompt_and_answer_past_the_model_s_positions_are_refused(base, tmp_path):
    folder, _ = base   # 256 positions
    data_file = write_jsonl(tmp_path / "v.jsonl", alpaca_rows(2))
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(folder), "--task", "alpaca", "--data",
                          data_file, "--max-len", "200", "--max-new-tokens", "100", "--device", "cpu", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        "eval.py: error: --max-len: the longest prompt plus the answer: 300 tokens, past the model's 256 positions "
        "(max_position_embeddings); lower it (or --max-new-tokens)"]


def test_jsquad_is_built_in():
    assert JSQUAD.free_form and JSQUAD.fields == ["context", "question"] and JSQUAD.cut == ["context"]
    assert JSQUAD.references({"text": ["東京", "東京都"], "answer_start": [3, 3]}) == ["東京", "東京都"]
