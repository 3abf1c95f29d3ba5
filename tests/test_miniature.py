"""A shortened run of the offline miniature (experiments/miniature.py): the whole pipeline through minicalm's own
code, on the real review files. The full-length run and its table are in the README."""
import json

import pytest
from conftest import REVIEWS, need

from experiments import miniature
from experiments.miniature import MiniatureConfig, first_sentence_rows, run, run_free_form
from hub import use_hub
from minicalm import CalmConfig, CalmForCausalLM, save_checkpoint
from minicalm.io.weights import load_model
from minicalm.tasks.data import Row
from minicalm.tools.cli import Flags


def test_micro_pipeline_lora_teaches_the_answer_format(tmp_path):
    need(REVIEWS)
    res = run(MiniatureConfig(out=str(tmp_path), train_file=str(REVIEWS / "train.jsonl"),
                              valid_file=str(REVIEWS / "valid.jsonl"), pretrain_steps=120, lora_steps=60),
              eval_limit=64, vocab_size=1000, log=False)
    # 3. the pretrained model is an ordinary checkpoint folder
    saved = {p.name for p in (tmp_path / "pretrain" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= saved
    load_model(tmp_path / "pretrain" / "model")
    # 5. LoRA lowers the answer loss ...
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # ... and the invalid-answer rate falls (the post's story: 98.5% -> 0%)
    before, after = res["before"]["generate"], res["after"]["generate"]
    assert before["n"] == after["n"] == 64
    assert after["invalid_rate"] < before["invalid_rate"]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "before LoRA" in report and "OpenCALM-7B + LoRA, 3 epochs (post)" in report


def test_micro_with_a_task_file(tmp_path, monkeypatch):
    """--task FILE with its own rows: the README's three-class files through the same pipeline (shortened)."""
    from test_task import three_class_files
    (tmp_path / "files").mkdir()
    task, train, valid = three_class_files(tmp_path / "files", monkeypatch)
    res = run(MiniatureConfig(out=str(tmp_path / "run"), train_file=train, valid_file=valid, task=task,
                              pretrain_steps=60, lora_steps=30), eval_limit=30, vocab_size=1000, log=False)
    assert res["task"] == "amazon-ja-3" and res["before"]["generate"]["n"] == 30
    assert set(res["after"]["generate"]["confusion"]) == {"positive", "neutral", "negative"}
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "task amazon-ja-3" in report and "(post)" not in report


def test_micro_without_data_says_what_to_pass(standin_hub, tmp_path, monkeypatch, capsys):
    """Outside this workplace there is no ../shared: the default is the task's own data from the hub, and when that
    cannot be had (offline, nothing cached), one line says so and what to pass instead."""
    use_hub(monkeypatch, standin_hub, tmp_path / "hf_home", offline=True)
    monkeypatch.setenv("HOME", str(tmp_path))   # an empty ~/.cache/minicalm
    standin_hub.log.clear()
    with pytest.raises(SystemExit) as e:
        miniature.main(["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err   # the command's one line on stderr, exit status 1 (minicalm.tools.cli)
    assert e.value.code == 1 and err.endswith("\n")
    msg = err[:-1]
    assert msg.startswith("experiments/miniature.py: error: HF_HUB_OFFLINE is set and dataset shunk031/JGLUE "
                          "(revision refs/convert/parquet) file MARC-ja/jglue-train.parquet is not in the hub cache")
    assert msg.endswith("or pass --train-file and --valid-file (JSON lines with sentence, label)") and "\n" not in msg
    assert not (tmp_path / "run").exists() and standin_hub.log == []   # offline: not one request


def test_micro_refuses_an_out_an_earlier_run_used(tmp_path, capsys):
    """A second run into the same --out would train over the first one's files: it is refused at the start, in one
    line naming the folder, what is there and what to do, before anything is read or written."""
    (tmp_path / "run" / "pretrain").mkdir(parents=True)
    (tmp_path / "run" / "pretrain" / "state.pt").write_bytes(b"")   # an earlier run's checkpoint
    with pytest.raises(SystemExit) as e:
        miniature.main(["--out", str(tmp_path / "run"), "--train-file", "no-such.jsonl", "--valid-file", "no.jsonl"])
    assert e.value.code == 1 and capsys.readouterr().err == (
        f"experiments/miniature.py: error: --out {tmp_path / 'run'} already holds pretrain from an earlier run; "
        f"choose another --out or delete it\n")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["pretrain"]


def test_rank_sweep_on_one_base(base, tmp_path, capsys):
    """--sweep-ranks: one adapter per rank on the same base; trainable parameters grow as r (in + out) per layer.
    The same sweep again into the same --out is refused (each adapter's folder holds a run)."""
    folder, _ = base
    argv = ["--out", str(tmp_path / "sweep"), "--sweep-ranks", "1,4", "--base", str(folder),
            "--train-file", str(REVIEWS / "train.jsonl"), "--valid-file", str(REVIEWS / "valid.jsonl"),
            "--lora-epochs", "0.004", "--lora-targets", "query_key_value,dense_4h_to_h"]
    miniature.main(argv)
    res = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    per_rank = 2 * ((64 + 3 * 64) + (128 + 64))   # two layers: query_key_value 64 -> 192, dense_4h_to_h 128 -> 64
    assert [(x["label"], x["r"], x["alpha"], x["trainable"]) for x in res["runs"]] == [
        ("r1", 1, 2, per_rank), ("r4", 4, 8, 4 * per_rank)]
    assert (tmp_path / "sweep" / res["base"]).resolve() == folder.resolve()   # relative: no machine paths
    assert res["targets"] == ["query_key_value", "dense_4h_to_h"]
    assert all(0 <= x["accuracy"] <= 1 and x["steps"] == 3 == len(x["loss"]) and x["seconds_per_step"] > 0
               for x in res["runs"])
    for picture in ("sweep.png", "losses.png"):
        assert (tmp_path / "sweep" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n") == 4
    assert (tmp_path / "sweep" / "r4" / "adapter").is_dir()
    assert not (tmp_path / "sweep" / "pretrain").exists()   # the given base was reused, nothing pretrained
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        miniature.main(argv)
    assert e.value.code == 1 and capsys.readouterr().err == (
        f"experiments/miniature.py: error: --out {tmp_path / 'sweep'} already holds r1, r4, sweep.json, sweep.md from "
        f"an earlier run; choose another --out or delete it\n")


def test_sweep_settings_cross_ranks_and_variants():
    """--sweep-ranks with --sweep-variants trains every variant at every rank (rsLoRA against LoRA across ranks);
    either alone keeps its own labels; an unknown variant is named."""
    settings = lambda *argv: miniature.sweep_settings(Flags(MiniatureConfig, miniature.PROG).parse(list(argv)))
    assert settings("--sweep-ranks", "1,4", "--sweep-variants", "lora,rslora") == {
        "lora-r1": {"r": 1, "variant": "lora"}, "lora-r4": {"r": 4, "variant": "lora"},
        "rslora-r1": {"r": 1, "variant": "rslora", "lora": {"use_rslora": True}},
        "rslora-r4": {"r": 4, "variant": "rslora", "lora": {"use_rslora": True}}}
    assert list(settings("--sweep-ranks", "2,8", "--use-rslora")) == ["r2-rslora", "r8-rslora"]
    assert settings("--sweep-variants", "qlora", "--lora-r", "8") == {"qlora": {"r": 8, "variant": "qlora",
                                                                                "quantize": "nf4"}}
    with pytest.raises(ValueError, match="--sweep-variants: unknown lorax; known: lora, dora"):
        settings("--sweep-variants", "lora,lorax")


def test_variant_sweep_with_dora_s_analysis(base, tmp_path):
    """--sweep-variants: every variant at one rank on the same base; LoRA+ and rsLoRA train the same parameters as
    LoRA, DoRA adds one magnitude per output row; DoRA's analysis follows one layer at every step of LoRA and DoRA."""
    folder, _ = base
    miniature.main(["--out", str(tmp_path / "v"), "--sweep-variants", "lora,dora,rslora,pissa,olora,loraplus",
                    "--lora-r", "2", "--base", str(folder), "--train-file", str(REVIEWS / "train.jsonl"),
                    "--valid-file", str(REVIEWS / "valid.jsonl"), "--lora-steps", "4"])
    runs = {x["label"]: x for x in json.loads((tmp_path / "v" / "sweep.json").read_text())["runs"]}
    assert list(runs) == ["lora", "dora", "rslora", "pissa", "olora", "loraplus"]
    plain = runs["lora"]["trainable"]
    assert {k: x["trainable"] for k, x in runs.items()} == {k: plain for k in runs} | {"dora": plain + 2 * (
        3 * 64 + 64 + 128 + 64)}   # m: one per output row of the four targets in two layers
    for label in ("lora", "dora"):
        points = runs[label]["dora_analysis"]
        assert [p["step"] for p in points] == [1, 2, 3, 4] and all(p["dD"] >= 0 and p["dM"] >= 0 for p in points)
    for picture in ("losses.png", "dora_analysis.png"):
        assert (tmp_path / "v" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "v" / "sweep.png").exists()   # one rank: no accuracy-against-rank picture


def test_first_sentence_rows_keep_a_short_first_sentence_with_more_after_it():
    """The free-form rows: the review as the input, its first sentence (up to and including 。) as the output, kept
    only where that sentence is one line of at most 40 characters and the review goes on after it."""
    texts = ["良い商品です。また買います。", "一文だけのレビュー。", "句点のないレビュー", "長" * 40 + "。続き。",
             "改行\nのある文。続き。", " 前後の空白。も。 "]
    rows = first_sentence_rows([Row({"sentence": t}, "positive", str(i)) for i, t in enumerate(texts)])
    assert [(r["input"], r["output"]) for r in rows] == [("良い商品です。また買います。", "良い商品です。"),
                                                         ("前後の空白。も。", "前後の空白。")]
    assert {r["instruction"] for r in rows} == {miniature.INSTRUCTION}


@pytest.fixture(scope="module")
def long_base(base, tmp_path_factory):
    """conftest's tiny random base with 512 positions, as the miniature's has: a free-form prompt (256 tokens) with a
    solved row before it and its answer fit."""
    _, tok = base
    cfg = CalmConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512)
    return save_checkpoint(CalmForCausalLM(cfg).init_weights(seed=0), tmp_path_factory.mktemp("long") / "base",
                           tokenizer_dir=tok.path.parent)


def test_free_form_story_before_k_shot_and_after(long_base, tmp_path, capsys):
    """--free-form (shortened) on a given base: the first-sentence rows as Alpaca-format JSON lines, then the table's
    three rows (the base zero-shot, k-shot, base + LoRA) of exact match, char F1, answer loss and empty answers, and
    held-out rows gold beside each answer. The same story again into the same --out is refused."""
    argv = ["--out", str(tmp_path / "ff"), "--free-form", "--base", str(long_base), "--shots", "1", "--lora-steps", "4",
            "--train-file", str(REVIEWS / "train.jsonl"), "--valid-file", str(REVIEWS / "valid.jsonl")]
    cfg = Flags(MiniatureConfig, miniature.PROG).parse(argv)
    res = run_free_form(cfg, eval_limit=16, log=False)
    out = tmp_path / "ff"
    rows = [json.loads(ln) for ln in (out / "free_form" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == res["rows"]["train"] > 1000
    assert all(r["input"].startswith(r["output"]) and r["output"].endswith("。") and len(r["output"]) <= 40
               for r in rows)
    assert json.loads((out / "free_form" / "task.json").read_text())["from"] == "alpaca"
    saved = json.loads((out / "free_form.json").read_text(encoding="utf-8"))
    for name in ("before", "k_shot", "after"):
        m = saved[name]
        assert m["n"] == 16 and 0 <= m["exact_match"] <= m["char_f1"] <= 1 and m["answer_loss"] > 0
    assert saved["lora"]["step"] == 4 and (out / "free_form" / "lora" / "adapter").is_dir()
    assert not (out / "pretrain").exists()   # the given base, nothing pretrained
    report = (out / "free_form.md").read_text(encoding="utf-8")
    table = [ln for ln in report.splitlines() if ln.startswith("| micro GPT-NeoX")]
    assert [ln.split(" | ")[0] for ln in table] == ["| micro GPT-NeoX (0.1M params) before LoRA, zero-shot",
                                                    "| micro GPT-NeoX before LoRA, 1-shot",
                                                    "| micro GPT-NeoX + LoRA, zero-shot"]
    assert "| model | exact match | char F1 | answer loss | empty answers |" in report
    golds = [ln for ln in report.splitlines() if ln.startswith("- gold ")]
    assert len(golds) == 3 and all("zero-shot " in g and "1-shot " in g and "+ LoRA " in g for g in golds)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        miniature.main(argv)
    assert e.value.code == 1 and capsys.readouterr().err == (
        f"experiments/miniature.py: error: --out {out} already holds free_form, free_form.json, free_form.md from an "
        f"earlier run; choose another --out or delete it\n")


def test_jglue_story_rows_ask_what_only_the_review_answers():
    """feeling-word: one word of praise, one of complaint, three topics, the answer the review's kind (the choices
    alone leave two); how-positive: five openings, k of them from positive reviews, the answer k."""
    from experiments.miniature import COMPLAINT, PRAISE, TOPICS, feeling_word_rows, how_positive_rows, openings
    from minicalm.tasks.data import read_jsonl
    reviews = read_jsonl(need(REVIEWS / "valid.jsonl"), limit=300)
    by_text = {r.text: r.label for r in reviews}
    for row in feeling_word_rows(reviews, 100, seed=0):
        choices = [row[f"choice{k}"] for k in range(5)]
        assert sum(c in PRAISE for c in choices) == sum(c in COMPLAINT for c in choices) == 1
        assert sum(c in TOPICS for c in choices) == 3
        assert choices[row["label"]] in (PRAISE if by_text[row["review"]] == "positive" else COMPLAINT)
    pool = openings(reviews)
    for row in how_positive_rows(reviews, 50, seed=0):
        lines = row["text"].split("\n")
        assert len(lines) == 5 and row["positives"] == sum(s in pool["positive"] for s in lines)
