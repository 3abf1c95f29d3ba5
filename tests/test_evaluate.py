"""minicalm.evaluate: label likelihoods equal transformers' log-probabilities; greedy answers equal
greedy_generate and transformers' generate; batching and the shared-prefix KV reuse change nothing; a model that
learned nothing answers invalid and one that always answers a label gets the metrics that label implies; eval.py
writes consistent files, refuses bad input clearly, and leaves the model's mode and LoRA as it found them.

A random tiny GPT-NeoX checkpoint (transformers' save_pretrained) with a 500-token BPE trained on real reviews keeps
the prompts around 300 tokens, so every test runs in seconds on a CPU."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FP32_REL, REVIEWS, ROOT, assert_close_to_scale, hf_tiny, need
from minicalm import LoRALinear, apply_lora, greedy_generate, load_model, load_tokenizer, save_adapter
from minicalm.tasks import data
from minicalm.tools import evaluate
from minicalm.tools.evaluate import POST_ROWS, EvalConfig, evaluate_rows, run_eval
from minicalm.tasks.score import compute_metrics, parse_answer
from minicalm.tasks.task import MARC_JA
from minicalm.io.tokenizer import train_tokenizer
from reference import label_logprobs

LABELS = tuple(MARC_JA.labels)

MAX_LEN = 320     # the head takes ~250 of these tokens with the tiny BPE: reviews over ~65 tokens are cut
NEW = 8           # max_new_tokens, as eval.py's default


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 500-token byte-level BPE trained once on real reviews plus the prompt: the header gets merged tokens
    (prompts stay short) while ポジティブ/ネガティブ stay several tokens that share their first one."""
    texts = [r.text for r in data.read_jsonl(need(REVIEWS / "train.jsonl"), limit=1000)]
    texts += [MARC_JA.format({"sentence": ""})] * 20
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=500)


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory):
    """(checkpoint folder with tokenizer.json beside the weights, minicalm model, transformers model).

    initializer_range 0.2 instead of 0.02: a model that sensitive to its input answers each review differently
    (and some stop early), so a mixed-up row or a missed stop shows in the greedy tokens."""
    folder, hf = hf_tiny(tmp_path_factory.mktemp("eval"), vocab_size=tok.vocab_size, max_position_embeddings=512,
                         initializer_range=0.2)
    shutil.copy(tok.path, folder / "tokenizer.json")
    return folder, load_model(folder, dtype=torch.float32), hf


@pytest.fixture(scope="module")
def reviews() -> list[data.Row]:
    """The first 12 validation reviews: 44 to 285 tokens, 7 of them cut to fit MAX_LEN, so batches mix padding."""
    return data.read_jsonl(need(REVIEWS / "valid.jsonl"), limit=12)


def prompt_ids(tok, reviews) -> list[list[int]]:
    enc = data.PromptEncoder(tok, MAX_LEN)
    return [ids for ids, _ in enc.encode_prompts(reviews)]


def answer_ids(tok) -> list[list[int]]:
    return [data.PromptEncoder(tok, MAX_LEN).answer_ids[label] for label in LABELS]


def hf_logprob(hf, prompt: list[int], answer: list[int]) -> float:
    """transformers' summed log-probability of the answer tokens after the prompt (fp64 softmax)."""
    with torch.no_grad():
        logp = hf(torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer))


def up_to_stop(tokens: list[int], stops: tuple[set[int], set[int]]) -> list[int]:
    """Tokens up to and including the first stop token (what evaluation keeps of a greedy answer); a blank-line
    token stops only after some other token."""
    stop, blank = stops
    cut = next((k + 1 for k, t in enumerate(tokens) if t in stop and (t not in blank or
                                                                     any(u not in blank for u in tokens[:k]))),
               len(tokens))
    return tokens[:cut]


class Recorder:
    """Wraps evaluate's calls of generate.decode_n_tokens and generate.score_continuations to keep their raw outputs
    (greedy tokens, label scores), batch by batch.

    evaluate_rows visits the reviews in one length-sorted order whatever the batch size or prefix reuse, so
    the rows of torch.cat(recorded) line up between two runs on the same reviews."""

    def __init__(self, monkeypatch):
        self.tokens: list[list[int]] = []
        self.scores: list[torch.Tensor] = []
        decode, score = evaluate.decode_n_tokens, evaluate.score_continuations

        def record_tokens(*args, **kw):
            steps = list(decode(*args, **kw))   # each step's (B,) tokens
            self.tokens += torch.stack(steps, dim=1).tolist()
            return iter(steps)

        def record_scores(*args, **kw):
            scores = score(*args, **kw)
            self.scores.append(scores.clone())
            return scores

        monkeypatch.setattr(evaluate, "decode_n_tokens", record_tokens)
        monkeypatch.setattr(evaluate, "score_continuations", record_scores)

    def reset(self):
        self.tokens, self.scores = [], []


# ----------------------------------------------------------------------------- evaluate_rows

def test_likelihood_matches_transformers(tok, tiny, reviews):
    _, model, hf = tiny
    prompts, answers = prompt_ids(tok, reviews), answer_ids(tok)
    # What this exercises: multi-token label words of different lengths that share their first token.
    assert min(map(len, answers)) > 1 and answers[0][0] == answers[1][0] and len(answers[0]) != len(answers[1])
    assert len({len(p) for p in prompts}) > 4 and min(map(len, prompts)) < max(map(len, prompts)) - 20
    want = torch.tensor([[hf_logprob(hf, p, a) for a in answers] for p in prompts], dtype=torch.float32)

    out = evaluate_rows(model, tok, reviews, max_len=MAX_LEN, batch_size=4, mode="likelihood", log=False)
    preds = out["predictions"]
    assert [(p["id"], p["gold"]) for p in preds] == [(r.id, r.label) for r in reviews]   # input order
    got = torch.tensor([[p[f"logprob_{label}"] for label in LABELS] for p in preds])
    assert_close_to_scale(got, want)   # log-probabilities of ~60 here, stored rounded to 5 decimals (1e-7 of that)
    assert_close_to_scale(got, label_logprobs(model, prompts, answers))
    assert [p["likelihood_answer"] for p in preds] == [LABELS[int(w.argmax())] for w in want]
    assert "answer" not in preds[0] and out["metrics"]["n"] == len(reviews) and out["metrics"]["invalid_rate"] == 0
    assert out["metrics"] == compute_metrics([r.label for r in reviews], [p["likelihood_answer"] for p in preds])

    both = evaluate_rows(model, tok, reviews, max_len=MAX_LEN, batch_size=4, mode="both", log=False)
    assert set(both["metrics"]) == {"generate", "likelihood"}
    assert both["metrics"]["likelihood"] == out["metrics"]
    assert [{k: p[k] for k in preds[0]} for p in both["predictions"]] == preds   # same scores, plus the answers


def test_batching_and_prefix_reuse_change_nothing(tok, tiny, reviews, monkeypatch):
    _, model, _ = tiny
    rec, stops = Recorder(monkeypatch), tok.line_end_ids
    runs = {}
    for batch_size, reuse, mode in ((8, True, "both"), (1, True, "both"), (8, False, "both"), (8, True, "generate")):
        rec.reset()
        out = evaluate_rows(model, tok, reviews, max_len=MAX_LEN, batch_size=batch_size, max_new_tokens=NEW,
                               mode=mode, share_prefix=reuse, log=False)
        runs[batch_size, reuse, mode] = (out, [up_to_stop(t, stops) for t in rec.tokens],
                                         torch.cat(rec.scores) if rec.scores else None)
    ref_out, ref_tokens, ref_scores = runs[8, True, "both"]
    assert len(ref_tokens) == len(reviews) and ref_scores.shape == (len(reviews), 2)
    assert len(set(map(tuple, ref_tokens))) > len(reviews) // 2           # the answers differ from row to row
    assert min(map(len, ref_tokens)) < NEW == max(map(len, ref_tokens))   # some rows stop early, some run on
    # Greedy tokens are compared exactly and scores to rounding: batch 1 against batch 8, and prefix reuse, run other
    # matmul shapes, so scores differ in the last bits (2e-7 of their ~60 under AVX-512); an argmax could flip only
    # at a near-tie of two logits, which these answers do not have on any kernel set (avx512, avx2, default).
    for key, (out, tokens, scores) in runs.items():
        assert tokens == ref_tokens, key                               # the same greedy tokens, row for row
        for p, q in zip(out["predictions"], ref_out["predictions"]):
            assert (p["continuation"], p["answer"]) == (q["continuation"], q["answer"]), key
        if scores is not None:
            assert_close_to_scale(scores, ref_scores, msg=str(key))
    assert runs[8, True, "generate"][0]["metrics"] == ref_out["metrics"]["generate"]


def test_greedy_answers_match_greedy_generate_and_transformers(tok, tiny, reviews, monkeypatch):
    _, model, hf = tiny
    rec, stops = Recorder(monkeypatch), tok.line_end_ids
    assert tok.eos_token_id in stops[0] and tok.encode("\n")[0] in stops[0] and tok.encode("\n")[0] in stops[1]
    lengths = []
    for review, prompt in list(zip(reviews, prompt_ids(tok, reviews)))[:3]:
        rec.reset()
        pred = evaluate_rows(model, tok, [review], max_len=MAX_LEN, max_new_tokens=NEW, log=False)["predictions"][0]
        ids = torch.tensor([prompt])
        ours = greedy_generate(model, ids, NEW, eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        got = up_to_stop(rec.tokens[0], stops)
        assert got == up_to_stop(ours, stops) == up_to_stop(theirs, stops)
        assert pred["continuation"] == tok.decode([t for t in got if t != tok.eos_token_id])
        lengths.append(len(got))
    assert min(lengths) < NEW == max(lengths)   # one answer stops early (here at EOS), the others run to NEW


def test_untrained_model_answers_invalid(tok, tiny, reviews):
    out = evaluate_rows(tiny[1], tok, reviews, max_len=MAX_LEN, max_new_tokens=NEW, log=False)
    m = out["metrics"]
    assert all(p["answer"] is None for p in out["predictions"])
    assert (m["invalid_rate"], m["accuracy"], m["n_valid"], m["n"]) == (1.0, 0.0, 0, len(reviews))
    assert sum(sum(row.values()) for row in m["confusion"].values()) == len(reviews)


def always_answers(model, chain: list[int]):
    """Edit a model into a bigram model that, after chain[0], emits chain[1], chain[2], ... greedily.

    Zeroing every attention and MLP output leaves the residual stream equal to the current token's embedding.
    The chain's tokens get orthogonal embeddings e_j and embed_out row chain[j+1] = 10 e_j (all other rows 0), so
    after chain[j] the logit of chain[j+1] is ~79 and every other logit is 0 or -1.3."""
    assert len(set(chain[:-1])) == len(chain) - 1, "a bigram model needs distinct tokens along the chain"
    C = model.config.hidden_size
    with torch.no_grad():
        for block in model.gpt_neox.layers:
            for linear in (block.attention.dense, block.mlp.dense_4h_to_h):
                linear.weight.zero_(), linear.bias.zero_()
        model.gpt_neox.final_layer_norm.weight.fill_(1.0), model.gpt_neox.final_layer_norm.bias.zero_()
        model.embed_out.weight.zero_()
        for j, (t, nxt) in enumerate(zip(chain, chain[1:])):
            model.gpt_neox.embed_in.weight[t] = torch.eye(C)[j]
            model.embed_out.weight[nxt] = 10 * torch.eye(C)[j]
    return model


@pytest.mark.parametrize("label", LABELS)
def test_model_that_always_answers_a_label(tok, tiny, reviews, label):
    enc = data.PromptEncoder(tok, MAX_LEN)
    model = always_answers(load_model(tiny[0], dtype=torch.float32),
                           [enc.literal_ids[-1][-1]] + enc.answer_ids[label] + [tok.eos_token_id])
    out = evaluate_rows(model, tok, reviews, max_len=MAX_LEN, max_new_tokens=NEW, mode="both", log=False)
    word = MARC_JA.labels[label]
    for p in out["predictions"]:
        assert (p["continuation"], p["answer"], p["likelihood_answer"]) == (word, label, label)
        assert p[f"logprob_{label}"] > -1e-3 > -10 > p[f"logprob_{LABELS[1 - LABELS.index(label)]}"]
    golds = [r.label for r in reviews]
    assert 0 < golds.count(label) < len(golds)   # both labels occur, so the metrics are not trivial
    for m in out["metrics"].values():
        assert m == compute_metrics(golds, [label] * len(golds))
        assert m["accuracy"] == golds.count(label) / len(golds) and m["invalid_rate"] == 0
        assert m["confusion"] == {g: {label: golds.count(g), LABELS[1 - LABELS.index(label)]: 0, "invalid": 0}
                                  for g in LABELS}
        assert m["per_class"][label]["recall"] == 1.0 and m["balanced_accuracy"] == 0.5


def nonzero_lora(model, std: float = 0.2, seed: int = 1):
    """Give every LoRA layer a random B (B starts at zero, which would make the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return model


def test_model_mode_and_dropout(tok, tiny, reviews):
    """Evaluation runs in eval mode (LoRA dropout off, so two runs agree) and hands the model back as it was."""
    model = nonzero_lora(apply_lora(load_model(tiny[0], dtype=torch.float32), r=4, dropout=0.5), std=0.1)
    kw = dict(max_len=MAX_LEN, max_new_tokens=2, mode="both", log=False)
    model.train()
    first = evaluate_rows(model, tok, reviews[:4], **kw)
    assert model.training and all(m.training for m in model.modules())
    assert evaluate_rows(model, tok, reviews[:4], **kw) == first
    model.eval()
    evaluate_rows(model, tok, reviews[:4], **kw)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="mode: must be one of generate, likelihood, both, got 'greedy'"):
        evaluate_rows(model, tok, reviews[:4], mode="greedy")


# ----------------------------------------------------------------------------- run_eval and eval.py

@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A PEFT-format adapter for the tiny checkpoint whose B is non-zero (so it changes the answers' scores)."""
    folder = tiny[0]
    model = apply_lora(load_model(folder, dtype=torch.float32), targets=("query_key_value", "dense"), r=4, alpha=8)
    nonzero_lora(model)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", str(folder))


def read_outputs(out):
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return metrics, preds, (out / "report.md").read_text(encoding="utf-8")


def test_run_eval_compare_base_writes_consistent_files(tiny, adapter, tmp_path, monkeypatch):
    folder, limit = tiny[0], 40
    valid = need(REVIEWS / "valid.jsonl")
    seen = []   # (LoRA layers disabled, model) at each evaluate_rows call
    inner = evaluate.evaluate_rows

    def spy(model, *args, **kw):
        seen.append(([m.disabled for m in model.modules() if isinstance(m, LoRALinear)], model))
        return inner(model, *args, **kw)

    monkeypatch.setattr(evaluate, "evaluate_rows", spy)
    cfg = EvalConfig(model=str(folder), adapter=str(adapter), data=str(valid), limit=limit, mode="both",
                     compare_base=True, max_len=MAX_LEN, out=str(tmp_path / "out"), device="cpu", log=False)
    result = run_eval(cfg)

    # The base run has every LoRA layer disabled, the adapter run none, and none is left disabled afterwards.
    (base_flags, model), (adapter_flags, _) = seen
    assert base_flags and all(base_flags) and not any(adapter_flags)
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALinear))

    metrics, preds, report = read_outputs(tmp_path / "out")
    ids = [r.id for r in data.read_jsonl(valid, limit=limit)]
    assert metrics["n_rows"] == limit and metrics["config"]["limit"] == limit
    assert len(preds) == 2 * limit
    for name in ("base", "adapter"):
        rows = [p for p in preds if p["model"] == name]
        assert [p["id"] for p in rows] == ids
        for mode in ("generate", "likelihood"):
            m = metrics[name][mode]
            assert m["n"] == limit and sum(sum(row.values()) for row in m["confusion"].values()) == limit
            key = "answer" if mode == "generate" else "likelihood_answer"
            assert m == json.loads(json.dumps(compute_metrics([p["gold"] for p in rows], [p[key] for p in rows])))
        assert all(p["answer"] == parse_answer(p["continuation"]) for p in rows)
    base, lora = ([p["logprob_positive"] for p in preds if p["model"] == k] for k in ("base", "adapter"))
    assert base != lora   # the adapter changes the scores: the two runs really used different models

    # The base run is the plain checkpoint: the same scores as evaluating it without any adapter.
    plain = inner(load_model(folder, dtype=torch.float32), load_tokenizer(folder), data.read_jsonl(valid, limit=limit),
                  max_len=MAX_LEN, mode="likelihood", log=False)
    assert [p["logprob_positive"] for p in plain["predictions"]] == pytest.approx(base, rel=FP32_REL)

    assert report == result["report"]
    for name in ("base", "adapter"):   # the confusion matrices as pictures beside the report, linked from it
        png = tmp_path / "out" / f"confusion_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(confusion_{name}.png)" in report
    for name, acc, invalid in POST_ROWS:   # the post's rows, as the report prints them
        assert f"| {name} | {100 * acc:.1f}% | {'-' if invalid is None else f'{100 * invalid:.1f}%'} |" in report
    assert f"| hf before fine-tuning | {100 * metrics['base']['generate']['accuracy']:.1f}% |" in report
    assert f"| hf + LoRA ({adapter}) |" in report and "Label likelihood" in report and f"({limit} rows, task marc-ja)" in report


def test_run_eval_likelihood_only_and_without_matplotlib(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # matplotlib is an optional extra
    run_eval(EvalConfig(model=str(tiny[0]), data=str(need(REVIEWS / "valid.jsonl")), limit=6, mode="likelihood",
                        max_len=MAX_LEN, out=str(out), device="cpu"))
    assert 'eval: no pictures: drawing needs matplotlib: pip install "minicalm[plot]"' in capsys.readouterr().err
    assert not list(out.glob("*.png"))
    metrics, preds, report = read_outputs(out)
    assert ".png" not in report
    assert metrics["base"]["n"] == 6 and len(preds) == 6 and all(p["model"] == "base" for p in preds)
    assert "answer" not in preds[0] and "likelihood_answer" in preds[0]
    assert "Greedy answers" not in report and "Label likelihood" in report

    merged = shutil.copytree(tiny[0], tmp_path / "merged")   # a merged (or fully trained) checkpoint has its task.json
    (merged / "task.json").write_text(json.dumps(MARC_JA.to_dict(), ensure_ascii=False), encoding="utf-8")
    run_eval(EvalConfig(model=str(merged), data=str(REVIEWS / "valid.jsonl"), limit=2, mode="likelihood",
                        max_len=MAX_LEN, out=str(out), device="cpu"))
    report = read_outputs(out)[2]
    assert "- merged (fine-tuned checkpoint): accuracy" in report and "before fine-tuning" not in report


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_eval_py_help_and_run(tiny, tmp_path):
    help_ = run_script("--help")
    assert help_.returncode == 0 and "--compare-base" in help_.stdout and "--limit" in help_.stdout
    out = tmp_path / "out"
    run = run_script("--model", tiny[0], "--data", need(REVIEWS / "valid.jsonl"), "--limit", 5, "--out", out,
                     "--max-len", MAX_LEN, "--device", "cpu")
    assert run.returncode == 0, run.stderr
    metrics, preds, report = read_outputs(out)
    assert metrics["n_rows"] == 5 and metrics["base"]["n"] == 5 and len(preds) == 5
    assert "| hf before fine-tuning |" in run.stdout and report.strip() in run.stdout
    bad = run_script("--model", tiny[0], "--data", need(REVIEWS / "valid.jsonl"), "--limit", 0, "--out", out)
    assert bad.returncode == 1 and "eval.py: error: --limit: must be a positive" in bad.stderr
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- bad input

def test_adapter_for_another_base_model(tok, tiny, tmp_path):
    other, _ = hf_tiny(tmp_path, "other", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64)
    wrong = save_adapter(apply_lora(load_model(other, dtype=torch.float32), r=4), tmp_path / "wrong", str(other))
    cfg = EvalConfig(model=str(tiny[0]), adapter=str(wrong), data=str(need(REVIEWS / "valid.jsonl")), limit=2,
                     max_len=MAX_LEN, out=str(tmp_path / "out"), device="cpu", log=False)
    with pytest.raises(ValueError, match=r"wrong: gpt_neox\.layers\.0\.attention\.query_key_value has A \(4, 32\) "
                                         r"and B \(96, 4\); the model's layer is 192 x 64"):
        run_eval(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    (json.dumps({"sentence": "x", "label": "neutral", "review_id": "b"}), "unknown label 'neutral'"),
    ('{"sentence": "途中で切れた', "not valid JSON"),
])
def test_bad_data_line(tiny, tmp_path, line, message):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"sentence": "良い", "label": "positive", "review_id": "a"}, ensure_ascii=False)
    bad.write_text(f"{good}\n\n{line}\n", encoding="utf-8")   # line 2 blank, line 3 bad
    cfg = EvalConfig(model=str(tiny[0]), data=str(bad), max_len=MAX_LEN, out=str(tmp_path / "out"), device="cpu",
                     log=False)
    with pytest.raises(ValueError, match=rf"{bad.name}:3: {message}"):
        run_eval(cfg)
    assert not (tmp_path / "out").exists()


def test_a_task_without_data_names_the_flag_to_pass(tiny, tmp_path):
    task = tmp_path / "t.json"
    task.write_text(json.dumps({"name": "t", "prompt": "{text}:", "labels": {"a": "A", "b": "B"}}))
    cfg = EvalConfig(model=str(tiny[0]), task=str(task), out=str(tmp_path / "out"), device="cpu", log=False)
    with pytest.raises(FileNotFoundError, match=r"task t names no validation data on the hub: pass --data \(JSON "
                                                r"lines with text, label\)"):
        run_eval(cfg)


@pytest.mark.parametrize("change, message", [
    (dict(limit=0), "EvalConfig.limit: must be a positive number"),
    (dict(limit=-3), "EvalConfig.limit: must be a positive number"),
    (dict(compare_base=True), "EvalConfig.compare_base: must be used with adapter"),
])
def test_bad_flags(tiny, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):   # refused where the settings are made
        run_eval(EvalConfig(model=str(tiny[0]), data=str(need(REVIEWS / "valid.jsonl")), out=str(tmp_path / "out"),
                            device="cpu", log=False, **change))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- nothing lost

def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tiny, tmp_path, monkeypatch):
    """After an hour of evaluation the results would be lost: --out is checked first (a file there; a place no one
    may write: a read-only folder, or /sys as root), one line naming it, nothing left behind."""
    file = tmp_path / "file"
    file.write_text("x")
    done = run_script("--model", tiny[0], "--data", need(REVIEWS / "valid.jsonl"), "--limit", 2, "--out", file,
                      "--max-len", MAX_LEN, "--device", "cpu")
    assert done.returncode == 1 and done.stderr == (f"eval.py: error: --out {file}: a file is there, not a folder; "
                                                    f"choose another --out\n")
    readonly = Path("/sys/minicalm-test") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if readonly.parent != Path("/sys"):
        readonly.parent.mkdir()
        readonly.parent.chmod(0o555)
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded: too late"))
    with pytest.raises(OSError, match=re.escape(f"--out {readonly}: cannot write there (")):
        run_eval(EvalConfig(model=str(tiny[0]), data=str(REVIEWS / "valid.jsonl"), limit=2, max_len=MAX_LEN,
                            out=str(readonly), device="cpu", log=False))
    assert file.read_text() == "x" and not readonly.exists()


def test_ctrl_c_during_evaluation_exits_130_and_leaves_no_results(tiny, tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, str(ROOT / "eval.py"), "--model", str(tiny[0]), "--data",
                                 str(need(REVIEWS / "valid.jsonl")), "--batch-size", "1", "--max-len", str(MAX_LEN),
                                 "--out", str(out), "--device", "cpu"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=ef,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 120
            while "eval:" not in err.read_text() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(0.3)   # answering rows
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = err.read_text()
    assert rc == 130, log[-2000:]
    assert log.rstrip().endswith("eval.py: stopped (Ctrl-C) before it was done; no file was left half-written")
    assert "Traceback" not in log and not out.exists()


def test_eval_takes_the_model_and_the_task_from_a_run_s_train_config(tiny, tmp_path):
    """--config RUN/train_config.json: the run's base and question (model, revision, task, dtype, quantize, device);
    not where the run wrote, nor its training settings."""
    from dataclasses import asdict
    from minicalm.train import TrainConfig
    run = asdict(TrainConfig(model=str(tiny[0]), task="marc-ja", out=str(tmp_path / "run"), device="cpu"))
    (tmp_path / "train_config.json").write_text(json.dumps({k: v for k, v in run.items() if k != "resume"}))
    out = tmp_path / "eval"
    done = run_script("--config", tmp_path / "train_config.json", "--data", need(REVIEWS / "valid.jsonl"), "--limit",
                      2, "--out", out, "--max-len", MAX_LEN)
    assert done.returncode == 0, done.stderr
    metrics = read_outputs(out)[0]
    assert metrics["model"] == str(tiny[0]) and metrics["config"]["device"] == "cpu" and not (tmp_path / "run").exists()
    (tmp_path / "other.json").write_text(json.dumps({"model": str(tiny[0]), "epochs": 3}))
    bad = run_script("--config", tmp_path / "other.json", "--out", out)
    assert bad.returncode == 1 and "epochs not among EvalConfig's settings" in bad.stderr
