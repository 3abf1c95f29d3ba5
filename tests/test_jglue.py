"""The rest of JGLUE: multiple choice (JCommonsenseQA: choices per row, each scored by its log-likelihood as the JP
harness scores it, against transformers; accuracy_norm per character; training on the right choice; greedy answers
matched to the choices), numbers as answers (JSTS: written with one decimal, read back by llm-jp-eval's rule, Pearson
and Spearman), both from the stand-in hub in their two layouts, the bad input of each in one line, evaluation's
max_len default, and `eval.py --suite jglue` (its files, its table, resuming where it stopped)."""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REVIEWS, ROOT, assert_close_to_scale, hf_tiny, need
from hub import PARQUET_REF
from minicalm import load_model
from minicalm.loss import IGNORE_INDEX
from minicalm.tasks import data
from minicalm.tasks.score import choice_metrics, llm_jp_float
from minicalm.tasks.task import JCOMMONSENSEQA, JSTS, load_task
from minicalm.tools import evaluate, suite
from minicalm.tools.evaluate import EvalConfig, evaluate_rows, run_eval

JGLUE = "shunk031/JGLUE"


def write(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(path)


def write_rows(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def question_rows(n: int, offset: int = 0) -> list[dict]:
    """JCommonsenseQA-shaped rows from real reviews: a question about a review's opening and five choices of 1 to 9
    characters (so their token counts differ), the right one's place cycling."""
    reviews = data.read_jsonl(need(REVIEWS / "valid.jsonl"), limit=offset + n + 8)[offset:]
    out = []
    for i in range(n):
        text = reviews[i].text
        words = [r.text[3:4 + (i + k) % 9] for k, r in enumerate(reviews[i:i + 5])]
        out.append({"q_id": i, "question": f"「{text[:30]}」の次は?", **{f"choice{k}": w for k, w in enumerate(words)},
                    "label": (2 * i) % 5})
    return out


@pytest.fixture(scope="module")
def hf(base, tmp_path_factory):
    """A transformers GPT-NeoX with the base tokenizer's vocabulary (the oracle) and minicalm's load of its files."""
    _, tok = base
    folder, model = hf_tiny(tmp_path_factory.mktemp("jglue"), vocab_size=tok.vocab_size, max_position_embeddings=512,
                            initializer_range=0.2, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    shutil.copy(tok.path, folder / "tokenizer.json")
    return folder, model, load_model(folder, dtype=torch.float32)


# ----------------------------------------------------------------------------- the stand-in hub's two new tasks

def published(hub, path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(hub.revision(JGLUE, PARQUET_REF, "dataset").files[path].data)).to_pylist()


def test_standin_serves_jcommonsenseqa_and_jsts_with_the_real_columns(standin_hub):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = standin_hub.revision(JGLUE, PARQUET_REF, "dataset").files
    assert sorted(p for p in files if p.startswith(("JCommonsenseQA/", "JSTS/"))) == [
        "JCommonsenseQA/train/0000.parquet", "JCommonsenseQA/validation/0000.parquet",   # the later layout
        "JSTS/jglue-train.parquet", "JSTS/jglue-validation.parquet"]                     # the older one
    jcqa = pq.read_schema(io.BytesIO(files["JCommonsenseQA/validation/0000.parquet"].data))
    assert jcqa.names == ["q_id", "question", *(f"choice{k}" for k in range(5)), "label"]
    jsts = pq.read_schema(io.BytesIO(files["JSTS/jglue-validation.parquet"].data))
    assert jsts.names == ["sentence_pair_id", "yjcaptions_id", "sentence1", "sentence2", "label"]
    assert jsts.field("label").type == pa.float32()   # the loading script's Value("float32")
    rows = published(standin_hub, "JCommonsenseQA/validation/0000.parquet")
    assert {r["label"] for r in rows} == set(range(5)) and all(r[f"choice{r['label']}"] in r["question"] for r in rows)


def test_task_data_reads_both_layouts_and_writes_the_similarity_with_one_decimal(standin_hub, hub_env, tmp_path):
    jcqa = data.read_jsonl(data.task_data(JCOMMONSENSEQA, "validation", cache_dir=tmp_path / "q"), JCOMMONSENSEQA)
    want = published(standin_hub, "JCommonsenseQA/validation/0000.parquet")
    assert [(r.id, r.choices, r.gold, r.label) for r in jcqa] == [
        (str(w["q_id"]), tuple(w[f"choice{k}"] for k in range(5)), w["label"], w[f"choice{w['label']}"]) for w in want]
    jsts = data.read_jsonl(data.task_data(JSTS, "validation", cache_dir=tmp_path / "s"), JSTS)
    floats = [w["label"] for w in published(standin_hub, "JSTS/jglue-validation.parquet")]
    assert any(f != round(f, 1) for f in floats)   # float32: 2.4 is 2.4000000953674316 ...
    assert [r.label for r in jsts] == [f"{f:.1f}" for f in floats] and {r.label for r in jsts} == {"5.0", "2.4", "0.6"}
    assert [r.fields for r in jsts][0].keys() == {"sentence1", "sentence2"}


# ----------------------------------------------------------------------------- multiple choice

def test_choice_log_likelihoods_are_transformers_prompt_plus_choice(base, hf):
    """Each choice's summed log-probability after the prompt, as the JP harness computes it (prompt + choice in one
    forward of transformers, per choice), in batches of rows whose choices run as one batch on copies of the rows'
    caches; batch 1, no shared prefix and batch 8 give the same numbers."""
    _, tok = base
    folder, oracle, model = hf
    rows = [data.parse_row(r, JCOMMONSENSEQA, i) for i, r in enumerate(question_rows(10))]
    enc = data.PromptEncoder(tok, 400, JCOMMONSENSEQA)
    prompts, choices = [ids for ids, _ in enc.encode_prompts(rows)], enc.choice_ids(rows)
    assert len({len(c) for cs in choices for c in cs}) >= 4 and min(len(c) for cs in choices for c in cs) == 1
    with torch.no_grad():
        want = torch.tensor([[oracle(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
                              .gather(-1, torch.tensor(c)[:, None]).sum().item() for c in cs]
                             for p, cs in zip(prompts, choices)])
    runs = {(b, share): evaluate_rows(model, tok, rows, JCOMMONSENSEQA, max_len=400, batch_size=b, share_prefix=share,
                                      log=False) for b, share in ((4, True), (1, True), (8, False))}
    for out in runs.values():
        got = torch.tensor([p["logprobs"] for p in out["predictions"]])
        assert_close_to_scale(got, want)
        assert [p["answer"] for p in out["predictions"]] == want.argmax(1).tolist()
        per_char = want / torch.tensor([[len(c) for c in r.choices] for r in rows])   # acc_norm: per character
        assert [p["answer_norm"] for p in out["predictions"]] == per_char.argmax(1).tolist()
        assert [p["gold"] for p in out["predictions"]] == [r.gold for r in rows]
    m = runs[4, True]["metrics"]
    assert m == choice_metrics([r.gold for r in rows], want.argmax(1).tolist(), per_char.argmax(1).tolist(), [5] * 10)
    assert m["chance"] == pytest.approx(0.2) and "generate" not in m   # likelihood is a choice task's default


def test_choice_metrics_by_hand():
    m = choice_metrics([0, 1, 2, 3], [0, 1, 0, 0], [0, 2, 2, 3], [5, 5, 4, 2])
    assert (m["n"], m["accuracy"], m["accuracy_norm"]) == (4, 0.5, 0.75)
    assert m["chance"] == pytest.approx((0.2 + 0.2 + 0.25 + 0.5) / 4)


def test_training_is_on_the_right_choice_with_the_prompt_masked_and_cut_alike(base):
    _, tok = base
    row = data.parse_row(question_rows(1)[0] | {"question": "長い質問です。" * 60}, JCOMMONSENSEQA, 1)
    enc = data.PromptEncoder(tok, 240, JCOMMONSENSEQA)
    ids, labels, cut = enc.encode_example(row)
    answer = tok.encode(row.choices[row.gold]) + [tok.eos_token_id]
    assert cut and ids[-len(answer):] == answer and labels == [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
    prompt, _ = enc.encode_prompt(row)   # evaluation's prompt is the training one: room for the longest choice
    assert ids[:-len(answer)] == prompt and len(prompt) + max(map(len, enc.choice_ids([row])[0])) + 1 == 240
    assert tok.decode(prompt).endswith("- " + "\n- ".join(row.choices) + "\n\n### Response:\n")   # choices never cut


def test_greedy_answers_are_matched_to_the_row_s_choices(base, hf):
    """A model edited to always write one text: a row whose choices hold it answers that choice's index, the others
    no valid answer; mode both keeps the likelihood's pick as answer beside it."""
    from test_evaluate import always_answers

    _, tok = base
    said = "満足"
    rows_in = question_rows(6)
    for k, r in enumerate(rows_in[:3]):   # the first three rows hold the text, at places 0, 1, 2
        r[f"choice{k}"] = said
    rows = [data.parse_row(r, JCOMMONSENSEQA, i) for i, r in enumerate(rows_in)]
    enc = data.PromptEncoder(tok, 400, JCOMMONSENSEQA)
    model = always_answers(load_model(hf[0], dtype=torch.float32),
                           [enc.literal_ids[-1][-1]] + tok.encode(said) + [tok.eos_token_id])
    out = evaluate_rows(model, tok, rows, JCOMMONSENSEQA, max_len=400, mode="generate", log=False)
    assert [p["continuation"] for p in out["predictions"]] == [said] * 6
    assert [p["answer"] for p in out["predictions"]] == [0, 1, 2, None, None, None]
    m = out["metrics"]
    golds = [r.gold for r in rows]
    assert m["invalid_rate"] == 0.5 and m["accuracy"] == sum(g == k for k, g in enumerate(golds[:3])) / 6
    both = evaluate_rows(model, tok, rows, JCOMMONSENSEQA, max_len=400, mode="both", log=False)
    assert [p["generated_answer"] for p in both["predictions"]] == [0, 1, 2, None, None, None]
    assert set(both["metrics"]) == {"generate", "likelihood"} and all("logprobs" in p for p in both["predictions"])


# ----------------------------------------------------------------------------- bad input, one line each

@pytest.mark.parametrize("change, message", [
    ({"label": 5}, ":2: label 5 is out of range for the row's 5 choices (0..4)"),
    ({"label": -1}, ":2: label -1 is out of range for the row's 5 choices (0..4)"),
    ({"label": "2"}, ":2: label '2' is not a choice's index (an int)"),
    ({"choice3": None}, ":2: no choice field 'choice3'"),
    ({"choice3": "  "}, ":2: choice field 'choice3' is empty"),
    ({"choice1": 7}, ":2: choice field 'choice1' is int, not a text"),
])
def test_bad_choice_rows_name_file_and_line(tmp_path, change, message):
    row = {k: v for k, v in (question_rows(2)[1] | change).items() if v is not None}
    path = write_rows(tmp_path / "q.jsonl", [question_rows(1)[0], row])
    with pytest.raises(ValueError) as e:
        data.read_jsonl(path, JCOMMONSENSEQA)
    assert str(e.value) == path + message


def test_a_choices_list_fills_the_prompt_and_its_bad_rows_are_named(tmp_path):
    task = load_task(write(tmp_path / "t.json", {"name": "list", "prompt": "Q: {question}\nA) {choice0}\nB) {choice1}\n",
                                                "choices_field": "options"}))
    rows = data.read_jsonl(write_rows(tmp_path / "r.jsonl", [{"question": "犬?", "options": ["犬", "猫", "鳥"],
                                                               "label": 2}]), task)
    assert (rows[0].choices, rows[0].gold, rows[0].label) == (("犬", "猫", "鳥"), 2, "鳥")
    assert task.format(rows[0].fields) == "Q: 犬?\nA) 犬\nB) 猫\n"
    for bad, message in (({"options": ["犬"]}, "options must be a list of at least two texts"),
                         ({"options": ["犬", ""]}, "choice 1 in 'options' is empty"), ({"options": None}, "no choices field 'options'")):
        path = write_rows(tmp_path / "b.jsonl", [{"question": "q", "label": 0, **bad}])
        with pytest.raises(ValueError, match=re.escape(f"{path}:1: {message}")):
            data.read_jsonl(path, task)


def test_a_jsts_row_whose_label_is_not_a_number(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 3.2},
                                             {"sentence1": "a", "sentence2": "b", "label": "似ている"}])
    with pytest.raises(ValueError) as e:
        data.read_jsonl(path, JSTS)
    assert str(e.value) == f"{path}:2: label '似ている' is not a number (task jsts scores pearson, spearman)"


@pytest.mark.parametrize("content, message", [
    ({"name": "t", "prompt": "{q}", "labels": {"a": "x", "b": "y"}, "choice_fields": ["c0", "c1"]},
     "task 't': labels and choice_fields both given: a task has labels (a classification), answer_field (free-form "
     "answers) or choice_fields / choices_field (multiple choice), one of them"),
    ({"name": "t", "prompt": "{q}", "answer_field": "a", "metrics": []}, "metrics must be a list naming at least one"),
    ({"name": "t", "prompt": "{q}", "answer_field": "a", "metrics": ["pearson", "bleu"]},
     "task 't': unknown metric 'bleu'; minicalm computes exact_match, char_f1, token_sort_ratio, set_f1, pearson, "
     "spearman"),
    ({"name": "t", "prompt": "{q}", "choice_fields": ["c0"]}, "choice_fields must name at least two distinct"),
    ({"name": "t", "prompt": "{q}", "choice_fields": ["c0", "c1"], "metrics": ["exact_match"]},
     "metrics is for free-form answers"),
    ({"instruction": "i", "output_length": 3, "metrics": ["exact_match", "rouge2"], "few_shots": [],
      "samples": [{"input": "a", "output": "b"}]},
     "unknown metric 'rouge2'; minicalm computes llm-jp-eval's exact_match, char_f1, set_f1, pearson, spearman"),
])
def test_bad_task_files_one_line_each(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError) as e:
        load_task(path)
    assert str(e.value).startswith(path) and message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_metric_is_refused_before_the_model_loads(tmp_path):
    path = write(tmp_path / "x.json", {"instruction": "i", "output_length": 3, "metrics": ["bleu_ja"],
                                       "few_shots": [], "samples": [{"input": "a", "output": "b"}]})
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(tmp_path / "no-such-model"), "--task",
                           path, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"eval.py: error: {path}: unknown metric 'bleu_ja'; minicalm computes llm-jp-eval's exact_match, char_f1, "
        f"set_f1, pearson, spearman"]


# ----------------------------------------------------------------------------- numbers as answers

def test_jsts_trains_on_the_number_as_text_and_scores_correlations(base, hf, tmp_path):
    _, tok = base
    rows = [data.parse_row({"sentence1": f"文{i}", "sentence2": "文", "label": x}, JSTS, i)
            for i, x in enumerate([3.2, 0.0, 5, 4.4000000953674316])]
    assert [r.label for r in rows] == ["3.2", "0.0", "5.0", "4.4"]
    ids, labels, _ = data.PromptEncoder(tok, 200, JSTS).encode_example(rows[0])
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "3.2" and labels[-1] == tok.eos_token_id
    out = evaluate_rows(hf[2], tok, rows, JSTS, log=False)
    m = out["metrics"]
    read = [llm_jp_float(p["answer"]) for p in out["predictions"]]
    assert m["n_unparsable"] == sum(x is None for x in read) and {"pearson", "spearman", "exact_match"} <= m.keys()
    from scipy.stats import pearsonr
    guesses = [-2.0 if x is None else x for x in read]
    r = pearsonr([3.2, 0.0, 5.0, 4.4], guesses)[0] if len(set(guesses)) > 1 else 0.0
    assert m["pearson"] == pytest.approx(0.0 if math.isnan(r) else r)


# ----------------------------------------------------------------------------- evaluation's length defaults

def test_max_len_defaults_to_what_fits_and_says_what_it_cut(base, tmp_path, capsys):
    """A 2-shot llm-jp-eval file of long reviews: refused at --max-len 256 (past the model's 256 positions with its
    answer), run by default at 256 - output_length, the cut rows said in one line."""
    folder, _ = base   # 256 positions
    reviews = data.read_jsonl(need(REVIEWS / "train.jsonl"), limit=200)
    rows = [{"input": r.text, "output": "positive" if r.label == "positive" else "negative"} for r in reviews]
    shots = [r | {"input": r["input"][:12]} for r in rows[:4]]   # short solved rows, long ones asked
    asked = [r for r in rows if len(r["input"]) > 250][:8]
    path = write(tmp_path / "long.json", {"instruction": "評価を書いて。", "output_length": 3, "metrics": ["exact_match"],
                                          "few_shots": shots, "samples": asked})
    with pytest.raises(Exception, match="past the model's 256 positions"):
        run_eval(EvalConfig(model=str(folder), task=path, shots=2, max_len=256, out=str(tmp_path / "a"), device="cpu",
                            log=False))
    out = run_eval(EvalConfig(model=str(folder), task=path, shots=2, out=str(tmp_path / "b"), device="cpu"))
    assert out["metrics"]["config"]["max_len"] == 256 - 3 and out["metrics"]["n_rows"] == 8
    err = capsys.readouterr().err
    assert "eval: 8 of 8 rows cut to fit --max-len 253\n" in err


# ----------------------------------------------------------------------------- the suite

def suite_run(hub_env, tmp_path, *args, env_home="home"):
    env = hub_env | {"HOME": str(tmp_path / env_home)}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), "--suite", "jglue", "--model",
                           "cyberagent/open-calm-small", "--limit", "3", "--device", "cpu", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_suite_runs_the_five_tasks_and_resumes_where_it_stopped(standin_hub, hub_env, tmp_path):
    out = tmp_path / "suite"
    done = suite_run(hub_env, tmp_path, "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = list(suite.SUITES["jglue"])
    for i, name in enumerate(names, 1):   # progress across tasks: a line as each starts and as it ends
        assert re.search(rf"^\[{i}/5\] {name}: 3 validation rows, 0-shot", done.stderr, re.M)
        assert re.search(rf"^\[{i}/5\] {name} done in \d+ s: ", done.stderr, re.M)
        m = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
        assert m["n_rows"] == 3 and m["task"]["name"] == name and (out / name / "report.md").is_file()
    s = json.loads((out / "suite.json").read_text(encoding="utf-8"))
    assert list(s["tasks"]) == names and s["shots"] == 0 and s["limit"] == 3
    assert set(s["tasks"]["marc-ja"]) == {"accuracy", "invalid_rate", "likelihood_accuracy", "n"}
    assert set(s["tasks"]["jsts"]) == {"pearson", "spearman", "n_unparsable", "n"}
    assert set(s["tasks"]["jsquad"]) == {"exact_match", "char_f1", "n"}
    assert set(s["tasks"]["jcommonsenseqa"]) == {"accuracy", "accuracy_norm", "chance", "n"}
    for name in names:   # the suite's numbers are each task's own
        m = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))["base"]
        assert s["tasks"][name] == suite.headline(load_task(name), m)
    md = (out / "suite.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| task")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["MARC-ja", "JSTS", "JNLI", "JSQuAD", "JCommonsenseQA"]
    assert "Tohoku BERT base 95.8%" in rows[0] and "open-calm-7b 3-shot 74.1%" in rows[0]
    assert "human 0.899 / 0.861" in rows[1] and "no JSTS there" in rows[1]
    assert "open-calm-7b 3-shot 24.2% / 24.4%" in rows[4] and "human 98.6%" in rows[4]

    # interrupted: two tasks lost their metrics.json (the last file written); only they run again
    kept = {n: (out / n / "metrics.json").stat().st_mtime_ns for n in names}
    for name in ("jnli", "jcommonsenseqa"):
        (out / name / "metrics.json").unlink()
    again = suite_run(hub_env, tmp_path, "--out", str(out))
    assert again.returncode == 0, again.stderr
    for i, name in enumerate(names, 1):
        rerun = name in ("jnli", "jcommonsenseqa")
        assert bool(re.search(rf"^\[{i}/5\] {name}: finished earlier", again.stderr, re.M)) != rerun
        assert ((out / name / "metrics.json").stat().st_mtime_ns == kept[name]) != rerun
    assert json.loads((out / "suite.json").read_text(encoding="utf-8"))["tasks"] == s["tasks"]   # same model, same rows

    other = suite_run(hub_env, tmp_path, "--out", str(out), "--shots", "1")   # other settings: not mixed in
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [
        f"eval.py: error: --shots: {out / 'marc-ja' / 'metrics.json'} was evaluated with shots 0, this run asks 1: "
        f"choose another --out, or delete {out / 'marc-ja'} to run it again"]


def test_suite_refuses_the_flags_of_one_task(standin_hub, hub_env, tmp_path):
    done = suite_run(hub_env, tmp_path, "--out", str(tmp_path / "s"), "--task", "jnli")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "eval.py: error: --task: not with suite: each of jglue's tasks has its own"]


def test_suite_loads_the_model_once(monkeypatch, standin_hub, hub_env, tmp_path):
    loads = []
    real = suite.load_model
    monkeypatch.setattr(suite, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res = suite.run_suite(EvalConfig(suite="jglue", model="cyberagent/open-calm-small", limit=2, out=str(tmp_path / "s"),
                              device="cpu", log=False))
    assert len(loads) == 1 and list(res["suite"]["tasks"]) == list(suite.SUITES["jglue"])
    assert evaluate.settled(EvalConfig(), JSTS, 512).max_len == 512 - 8 == 504   # each task's own fit


def test_generate_answers_a_question_with_each_choice_s_probability(base, hf):
    """`python -m minicalm generate --task jcommonsenseqa` takes the question and its five choices tab-separated: the
    greedy answer's choice (or invalid), what it wrote, each choice's probability (evaluation's numbers), the text."""
    from minicalm.tools.commands import answer_texts

    _, tok = base
    q = question_rows(1)[0]
    text = "\t".join([q["question"], *(q[f"choice{k}"] for k in range(5))])
    (line,) = list(answer_texts(hf[2], tok, JCOMMONSENSEQA, [text], 400, 8))
    answer, written, probs, echoed = line.split("\t", 3)
    want = evaluate_rows(hf[2], tok, [data.parse_row(q, JCOMMONSENSEQA, 0)], JCOMMONSENSEQA, max_len=400, mode="both",
                         log=False)["predictions"][0]
    assert echoed == text and written == repr(want["continuation"])
    assert answer == ("invalid" if want["generated_answer"] is None else str(want["generated_answer"]))
    assert probs == " ".join(f"p({k})={math.exp(x):.3f}" for k, x in enumerate(want["logprobs"]))
    hidden = write_task({"name": "list", "prompt": "Q: {question}\n", "choices_field": "o"})
    with pytest.raises(ValueError, match=r"^task list's choices are not all in its prompt, so a question cannot give "
                                         r"them: its fields are question$"):
        list(answer_texts(hf[2], tok, hidden, ["x"], 400, 8))


def write_task(d: dict):
    from minicalm.tasks.task import task_from_dict
    return task_from_dict(d, "t.json")
