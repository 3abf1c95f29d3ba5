"""Greedy decoding: the same tokens as transformers' generate(do_sample=False) at batch 1, for left-padded batches
and with an eos that is emitted mid-way; the KV cache gives exactly what recomputing the whole sequence gives.

Tokens are compared exactly. The logits behind them are not bit-identical (transformers, the cache and the full
recompute run other matmul shapes, and kernel sets differ in the last bits: see conftest), so an argmax could flip
only where two logits tie to within ~1e-6 of their scale; these seeds have no such tie under ATEN_CPU_CAPABILITY
avx512, avx2 or default, which CI runs."""
from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_close_to_scale, hf_tiny
from minicalm import greedy_generate, load_model
from minicalm.tasks.data import Row
from minicalm.tools.evaluate import evaluate_rows
from minicalm.generate import decode_n_tokens, left_pad, prefill, score_continuations
from minicalm.tools import commands
from minicalm.tasks.task import MARC_JA
from reference import greedy_no_cache

V, PAD, N = 128, 1, 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(minicalm model, transformers model) from the same random checkpoint; made once for the module."""
    folder, hf = hf_tiny(tmp_path_factory.mktemp("gen"), seed=3)
    return load_model(folder, dtype=torch.float32), hf


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (no pad or eos ids inside) left-padded to the longest: input_ids, attention_mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    input_ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, T - n:] = torch.randint(2, V, (n,), generator=g)
        mask[i, T - n:] = 1
    return input_ids, mask


def hf_greedy(hf, input_ids, mask, eos):
    with torch.no_grad():
        return hf.generate(input_ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                           eos_token_id=eos, pad_token_id=PAD)


def eos_emitted_midway(new: torch.Tensor) -> int:
    """A token the greedy rows (B, N) first emit at different steps, the earliest at step >= 2: with it as eos,
    one row stops mid-way while another runs on (padding), and decoding stops before N if every row emits it."""
    best = None
    for tok in range(2, V):
        first = [int((row == tok).nonzero()[0]) if (row == tok).any() else N for row in new]
        if min(first) >= 2 and min(first) < N - 4 and len(set(first)) == len(first):
            key = (max(first) < N, -abs(min(first) - N // 4))   # prefer: every row emits it; first stop near N/4
            best = max(best or (key, tok), (key, tok))
    assert best is not None, "no usable eos in this random model's output; change the seed"
    return best[1]


def test_batch_1_matches_transformers(models):
    model, hf = models
    x, mask = left_padded([9])
    want = hf_greedy(hf, x, mask, eos=0)
    got = greedy_generate(model, x, N, eos_token_id=0, pad_token_id=PAD)
    assert got.shape == (1, 9 + N)
    assert torch.equal(got, want)


def test_left_padded_batch_matches_transformers(models):
    model, hf = models
    x, mask = left_padded([11, 3, 7, 1])
    want = hf_greedy(hf, x, mask, eos=0)
    got = greedy_generate(model, x, N, eos_token_id=0, attention_mask=mask, pad_token_id=PAD)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lengths", [[9], [11, 3, 7]], ids=["batch1", "padded-batch"])
def test_eos_midway_stops_and_pads_like_transformers(models, lengths):
    model, hf = models
    x, mask = left_padded(lengths)
    T = x.shape[1]
    free = greedy_generate(model, x, N, eos_token_id=None, attention_mask=mask, pad_token_id=PAD)[:, T:]
    eos = eos_emitted_midway(free)
    want = hf_greedy(hf, x, mask, eos=eos)
    got = greedy_generate(model, x, N, eos_token_id=eos, attention_mask=mask, pad_token_id=PAD)
    assert torch.equal(got, want)
    # what the comparison exercised: a row stopped mid-way and was padded while another ran on, and decoding
    # ended as soon as every row had stopped
    new = got[:, T:]
    first = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in new]
    stops = [f for f in first if f is not None]
    assert stops and 2 <= min(stops) < N - 4
    assert new.shape[1] == (max(stops) + 1 if None not in first else N)
    for row, f in zip(new, first):
        if f is not None:
            assert (row[f + 1:] == PAD).all()
    if len(lengths) > 1:
        assert len(set(first)) == len(first)   # rows stopped at different steps: the early ones were padded


@pytest.mark.parametrize("lengths", [[9], [11, 3, 7]], ids=["batch1", "padded-batch"])
@pytest.mark.parametrize("eos", [None, "midway"])
def test_kv_cache_equals_recomputing_exactly(models, lengths, eos):
    model, _ = models
    x, mask = left_padded(lengths, seed=5)
    T = x.shape[1]
    if eos == "midway":
        free = greedy_generate(model, x, N, attention_mask=mask, pad_token_id=PAD)[:, T:]
        eos = eos_emitted_midway(free)
    cached = greedy_generate(model, x, N, eos_token_id=eos, attention_mask=mask, pad_token_id=PAD)
    full = greedy_no_cache(model, x, N, eos_token_id=eos, attention_mask=mask, pad_token_id=PAD)
    assert torch.equal(cached, full)
    assert cached.shape[1] == T + N or eos is not None


def test_prompt_is_kept_and_max_new_tokens_respected(models):
    model, _ = models
    x, mask = left_padded([5, 2])
    for n in (0, 1, 4):
        out = greedy_generate(model, x, n, eos_token_id=0, attention_mask=mask, pad_token_id=PAD)
        assert out.shape == (2, 5 + n) and out.dtype == x.dtype and torch.equal(out[:, :5], x)
        assert torch.equal(out, greedy_no_cache(model, x, n, eos_token_id=0, attention_mask=mask, pad_token_id=PAD))


def hf_logprob(hf, prompt: list[int], continuation: list[int]) -> float:
    """transformers' summed log-probability (fp64 softmax) of the continuation's tokens after the prompt."""
    with torch.no_grad():
        logp = hf(torch.tensor([prompt + continuation])).logits[0].double().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(continuation))


def test_continuation_scores_match_transformers(models):
    """score_continuations after prefill (what evaluation runs per batch): left-padded prompts of very different
    lengths in one batch, continuations that share their first token and differ in length, as label words may."""
    model, hf = models
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (7, 1, 23, 12, 30)]
    choices = [[5, 9, 17], [5, 11], [40]]
    with torch.inference_mode():
        logits, state = prefill(model, *left_pad(prompts, PAD), extra=3)
        got = score_continuations(model, logits, state, choices)
        assert got.shape == (5, 3) and got.dtype == torch.float32
        want = torch.tensor([[hf_logprob(hf, p, c) for c in choices] for p in prompts], dtype=torch.float32)
        assert_close_to_scale(got, want)
        logits, state = prefill(model, *left_pad(prompts, PAD), extra=3)
        again = score_continuations(model, logits, state, choices)
        new = torch.stack(list(decode_n_tokens(model, logits, state, 3, pad_id=PAD)), dim=1)   # decoding after scoring
    assert_close_to_scale(again, got)
    ids, mask = left_padded_lists(prompts)
    assert torch.equal(new, greedy_no_cache(model, ids, 3, attention_mask=mask, pad_token_id=PAD)[:, -3:])


def left_padded_lists(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])


# ----------------------------------------------------------------------------- python -m minicalm generate

def main(argv: list[str]) -> None:
    commands.main(["generate", *argv])


def test_command_answers_each_text_as_evaluation_does(base, capsys, monkeypatch):
    """One line per text (arguments, or lines of stdin): the answer evaluation would give, what the model wrote,
    each label word's probability (exp of evaluation's log-likelihood), the text."""
    folder, tok = base
    texts = ["良い商品です。", "二度と買いません。"]
    main(["--model", str(folder), "--device", "cpu", *texts])
    lines = capsys.readouterr().out.splitlines()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{texts[0]}\r\n\n{texts[1]}\n".encode())))
    main(["--model", str(folder), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines() == lines
    rows = [Row({"sentence": t}, "positive", str(i)) for i, t in enumerate(texts)]
    preds = evaluate_rows(load_model(folder), tok, rows, mode="both", log=False)["predictions"]
    assert len(lines) == 2
    for line, text, pred in zip(lines, texts, preds):
        answer, written, probs, echoed = line.split("\t")
        assert (answer, written, echoed) == (pred["answer"] or "invalid", repr(pred["continuation"]), text)
        assert probs == " ".join(f"p({k})={math.exp(pred[f'logprob_{k}']):.3f}" for k in MARC_JA.labels)


def test_command_answers_free_text_for_a_free_form_task(base, capsys):
    """--task alpaca: an instruction (and, after a tab, an input) in; the answer evaluation would write out, then the
    text; the default budget is the task's."""
    from dataclasses import replace

    from minicalm.tasks.task import ALPACA
    folder, tok = base
    texts = ["この文章の最初の文を書いて。\t良い商品です。安かった。", "挨拶して。"]
    main(["--model", str(folder), "--device", "cpu", "--task", "alpaca", "--max-new-tokens", "6", *texts])
    lines = capsys.readouterr().out.splitlines()
    rows = [Row({"instruction": "この文章の最初の文を書いて。", "input": "良い商品です。安かった。"}, "x", "0", ("x",)),
            Row({"instruction": "挨拶して。", "input": ""}, "x", "1", ("x",))]
    preds = evaluate_rows(load_model(folder), tok, rows, replace(ALPACA, max_new_tokens=6), log=False)["predictions"]
    assert lines == [f"{p['answer']}\t{t}".replace("\n", "\\n") for p, t in zip(preds, texts)]


def test_command_raw_continues_the_text_greedily_or_sampled(base, capsys):
    folder, tok = base
    text = "この商品は"
    main(["--model", str(folder), "--device", "cpu", "--raw", "--max-new-tokens", "12", text])
    ids = torch.tensor([tok.encode(text)])
    greedy = greedy_generate(load_model(folder), ids, 12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    cut = greedy.index(tok.eos_token_id) if tok.eos_token_id in greedy else len(greedy)
    assert capsys.readouterr().out == text + tok.decode(greedy[:cut]) + "\n"
    sampled = ["--model", str(folder), "--device", "cpu", "--raw", "--temperature", "1.5", "--top-k", "50", text]
    main(sampled + ["--seed", "1"])
    first = capsys.readouterr().out
    main(sampled + ["--seed", "1"])
    assert capsys.readouterr().out == first and first.startswith(text)   # the seed decides the sample


def test_command_refuses_a_text_without_the_task_s_fields_in_one_line(base, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(base[0]), "--device", "cpu", "--task", "jnli", "前提だけ"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == ("python -m minicalm generate: error: task jnli needs 2 tab-separated fields "
                                         "(sentence1, sentence2), got 1 in '前提だけ'\n")


def generate_cli(folder, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """python -m minicalm generate in its own process: what a user sees, exit status and all."""
    return subprocess.run([sys.executable, "-m", "minicalm", "generate", "--model", str(folder), "--device", "cpu",
                           *args], cwd=ROOT, input=stdin, capture_output=True, check=False, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


LONG = "良い商品です。" * 200   # some 1,400 characters: more tokens than the test model's 256 positions


@pytest.mark.parametrize("args, stdin, flag, says", [
    (["--max-new-tokens", "0", "良い"], b"", "--max-new-tokens", "must be at least 1, got 0"),
    (["--raw", "--max-new-tokens", "100000000", "この商品は"], b"", "--max-new-tokens",
     "tokens, past the model's 256 positions (max_position_embeddings); --raw cuts nothing"),
    (["--raw", LONG], b"", "--max-new-tokens", f"(text {LONG[:30]!r}...) plus 100 more: "),
    (["--max-new-tokens", "300", "良い"], b"", "--max-new-tokens",
     "tokens, past the model's 256 positions (max_position_embeddings); lower --max-len"),
    ([], "良い\n\n".encode() + b"\xff bad\n", "stdin:3", "not UTF-8 text (invalid start byte at byte 1 of the line)"),
], ids=["zero-new-tokens", "huge-budget", "raw-text-too-long", "answer-budget", "stdin-not-utf8"])
def test_command_refuses_what_would_go_silently_wrong_in_one_line(base, args, stdin, flag, says):
    """A setting or an input the model cannot honour ends the command before any output: exit status 1, one line
    naming the flag (or stdin and its line), no traceback. (A budget past the model's positions would make it write
    on at positions it never saw; a huge one would first allocate its cache.)"""
    done = generate_cli(base[0], *args, stdin=stdin)
    err = done.stderr.decode()
    assert (done.returncode, done.stdout) == (1, b""), err
    assert err.startswith(f"python -m minicalm generate: error: {flag}: ") and err.count("\n") == 1, err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, says", [("--temperature", "-1", "must be finite and >= 0 (0: greedy), got -1.0"),
                                               ("--temperature", "nan", "must be finite and >= 0 (0: greedy), got nan"),
                                               ("--top-k", "0", "must be at least 1, got 0"),
                                               ("--max-len", "0", "must be at least 1 token, got 0"),
                                               # sampling without --raw would be ignored: a task's answer is greedy
                                               ("--temperature", "0.7", "must be 0 without --raw (a task's answers "
                                                                        "are greedy), got 0.7"),
                                               ("--top-k", "5", "must be unset without --raw (a task's answers are "
                                                                "greedy), got 5")])
def test_command_checks_its_settings_before_loading(flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "no/such-model", flag, value, "良い"])   # refused before the model is looked for
    assert e.value.code == 1 and capsys.readouterr().err == f"python -m minicalm generate: error: {flag}: {says}\n"


def test_command_raw_budget_fills_the_model_s_positions_exactly(base, capsys):
    """The prompt plus the new tokens may take every one of the model's positions, not one more."""
    folder, tok = base
    text = "この商品は"
    room = 256 - len(tok.encode(text))
    main(["--model", str(folder), "--device", "cpu", "--raw", "--max-new-tokens", str(room), text])
    assert capsys.readouterr().out.startswith(text)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(folder), "--device", "cpu", "--raw", "--max-new-tokens", str(room + 1), text])
    assert e.value.code == 1 and f"tokens (text '{text}') plus {room + 1} more: 257 tokens, past" in capsys.readouterr().err
