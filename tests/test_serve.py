"""`python -m minicalm serve` driven by the openai client, as users drive it: the models it lists, completions (texts,
token ids, streams, logprobs, echo) equal to what the model answers alone through generate.py's static path, the
request shape lm-evaluation-harness's local-completions sends for log-likelihoods, /v1/answers equal to what
`python -m minicalm generate` prints, each fault its 4xx in the API's shape with the next request served, 32 clients
at once, a client gone mid-stream, SIGTERM, and the command's one-line refusals."""
from __future__ import annotations

import json
import shutil
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest
import torch

from conftest import ROOT, assert_close_to_scale, make_adapter
from minicalm import load_model
from minicalm.config import LoraConfig
from minicalm.generate import decode_one_token, prefill, score_continuations
from minicalm.io.adapter import load_adapters
from minicalm.multi_lora import row_adapters
from minicalm.tools.serve import SHUTDOWN_GRACE, ServeConfig, running


def config(serving, **changes) -> ServeConfig:
    folder, _, dirs = serving
    return ServeConfig(model=str(folder), adapter=[f"{name}={d}" for name, d in dirs.items()], port=0, device="cpu",
                       **changes)


@pytest.fixture(scope="module")
def api(serving):
    with running(config(serving)) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def twin(serving):
    """A second copy of the served model for the answers alone (the served one belongs to the engine's thread)."""
    folder, tok, dirs = serving
    model = load_model(folder).eval()
    names = [str(folder), *load_adapters(model, dirs)]
    return model, tok, names


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


NEAR_TIE = 1e-4   # log-probability gap: the rows beside a request move its logits by ~2e-6 (tests/test_engine.py)


def greedy_alone(twin, model_id: str, prompt: list[int], n: int) -> tuple[list[int], float]:
    """The greedy answer by itself, through generate.py's prefill and decode_one_token at batch 1 on the model's
    adapter, cut after EOS; and the smallest gap between the two likeliest tokens on the way."""
    model, tok, names = twin
    new, gap = [], math.inf
    with torch.inference_mode(), row_adapters(model, torch.tensor([names.index(model_id)])):
        logits, state = prefill(model, torch.tensor([prompt]), extra=n)
        while len(new) < n and tok.eos_token_id not in new:
            top = logits[0].float().log_softmax(-1).topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            new.append(int(logits[0].argmax()))
            if len(new) < n and new[-1] != tok.eos_token_id:
                logits = decode_one_token(model, torch.tensor(new[-1:]), state)
    return new, gap


def alone(twin, model_id: str, prompt: list[int], n: int) -> list[int]:
    """greedy_alone's tokens, checked to have no near-tie (else the test's premise fails, not the server)."""
    new, gap = greedy_alone(twin, model_id, prompt, n)
    assert gap > NEAR_TIE, f"a near-tie ({gap:.1e}) on the greedy path of {prompt}: pick another prompt"
    return new


def answer_text(tok, tokens: list[int]) -> str:
    eos = tok.eos_token_id
    return tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)


def test_models_lists_the_base_and_each_adapter_with_its_parent(api, serving):
    url, _ = api
    folder = str(serving[0])
    listed = {m.id: m for m in client(url).models.list().data}
    assert list(listed) == [folder, "marc", "marc-rs", "alpaca"]
    assert listed[folder].parent is None and all(listed[n].parent == folder for n in ("marc", "marc-rs", "alpaca"))
    assert listed["alpaca"].task == "alpaca" and listed["marc"].labels == ["positive", "negative"]
    assert listed["alpaca"].fields == ["instruction", "input"] and listed["marc"].fields == ["sentence"]
    assert httpx2.get(f"{url}/health").json() == {"status": "ok", "running": 0, "waiting": 0, "key": False}


def test_completions_answer_as_each_model_alone_for_every_kind_of_prompt(api, twin):
    """A text, a list of texts, token ids and a list of them: each choice the model's greedy answer alone."""
    url, _ = api
    _, tok, names = twin
    c = client(url)
    texts = ["この商品は", "届いた箱が潰れていました。"]
    ids = [tok.encode(t) for t in texts]
    for model_id in names:
        for prompt, want_ids in ((texts[0], ids[:1]), (texts, ids), (ids[1], ids[1:]), (ids, ids)):
            got = c.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0)
            assert [ch.index for ch in got.choices] == list(range(len(want_ids)))
            for ch, p in zip(got.choices, want_ids):
                want = alone(twin, model_id, p, 12)
                assert ch.text == answer_text(tok, want)
                assert ch.finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
            assert got.usage.prompt_tokens == sum(map(len, want_ids)) and got.model == model_id
    answers = {c.completions.create(model=m, prompt=texts[1], max_tokens=12, temperature=0).choices[0].text
               for m in names}
    assert len(answers) == 4   # each adapter answers its own way


def test_a_stream_sends_the_same_text_in_chunks_and_ends_with_done(api, twin):
    url, _ = api
    _, tok, _ = twin
    c = client(url)
    whole = c.completions.create(model="marc", prompt="この商品は", max_tokens=20, temperature=0, logprobs=2)
    chunks = list(c.completions.create(model="marc", prompt="この商品は", max_tokens=20, temperature=0, logprobs=2,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert [t for ch in chunks if ch.choices for t in ch.choices[0].logprobs.tokens] == whole.choices[0].logprobs.tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == 20
    with httpx2.stream("POST", f"{url}/v1/completions", json={"model": "marc", "prompt": "この", "max_tokens": 3,
                                                                "temperature": 0, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_logprobs_are_the_model_s_and_echo_gives_the_prompt_s(api, twin):
    url, _ = api
    model, tok, names = twin
    prompt = tok.encode("この商品は最高です。")
    got = client(url).completions.create(model="marc-rs", prompt=prompt, max_tokens=3, temperature=0, logprobs=3,
                                         echo=True).choices[0]
    lp = got.logprobs
    full = prompt + alone(twin, "marc-rs", prompt, 3)
    with torch.no_grad(), row_adapters(model, torch.tensor([names.index("marc-rs")])):
        want = model(torch.tensor([full]))[0].log_softmax(-1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(full)
    want_lp = want[:-1].gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    assert_close_to_scale(torch.tensor(lp.token_logprobs[1:]), want_lp)
    assert got.text == tok.decode(prompt) + answer_text(tok, full[len(prompt):])
    for top, row in zip(lp.top_logprobs[1:], want[:-1]):   # the top 3 (and the token itself), as the model ranks them
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    # where each prompt token's text begins (a token inside a character: where the character begins)
    boundaries = {i: len(t) for i in range(len(prompt)) if "\ufffd" not in (t := tok.decode(prompt[:i]))}
    assert {i: lp.text_offset[i] for i in boundaries} == boundaries and len(boundaries) < len(prompt)
    assert lp.text_offset == sorted(lp.text_offset)


def test_lm_evaluation_harness_loglikelihood_requests_score_as_minicalm_does(api, twin):
    """lm-evaluation-harness's local-completions (lm_eval/models/openai_completions.py) scores a continuation with
    {"model", "prompt": context + continuation token ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed":
    1234, "echo": true}, then sums choice.logprobs.token_logprobs[ctxlen:-1] and calls it greedy when each of those
    equals the largest value of its top_logprobs. The sum equals minicalm's score_continuations after the context."""
    url, _ = api
    model, tok, names = twin
    context = tok.encode("この商品は最高です。 評価:")
    conts = [tok.encode(" ポジティブ"), tok.encode(" ネガティブ"), alone(twin, "marc", context, 3)]
    body = {"model": "marc", "prompt": [context + c for c in conts], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx2.post(f"{url}/v1/completions", json=body, timeout=60).json()
    got, greedy = [], []
    for choice in sorted(out["choices"], key=lambda ch: ch["index"]):   # the harness's parse_logprobs, as written
        tokens_logprobs = choice["logprobs"]["token_logprobs"][len(context):-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][len(context):-1]
        got.append(sum(tokens_logprobs))
        greedy.append(all(t == max(top.values()) for t, top in zip(tokens_logprobs, top_logprobs)))
    with torch.inference_mode(), row_adapters(model, torch.tensor([names.index("marc")])):
        logits, state = prefill(model, torch.tensor([context]), extra=5)
        want = score_continuations(model, logits, state, conts)[0]
    assert_close_to_scale(torch.tensor(got), want)
    assert greedy[2] and greedy[:2] != [True, True]   # the model's own continuation is greedy; a label word is not


def test_sampling_follows_the_seed_and_stop_strings_cut_the_text(api, twin):
    url, _ = api
    c = client(url)
    ask = dict(model="alpaca", prompt="この商品は", max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    first, again = (c.completions.create(**ask).choices[0].text for _ in range(2))
    other = c.completions.create(**ask | {"seed": 8, "extra_body": {"top_k": 40}}).choices[0].text
    assert first == again and first != other
    two = c.completions.create(**ask | {"n": 2}).choices   # n choices: seeds seed, seed + 1
    eight = c.completions.create(**ask | {"seed": 8}).choices[0].text
    assert [ch.index for ch in two] == [0, 1] and [ch.text for ch in two] == [first, eight]
    free = c.completions.create(model="alpaca", prompt="この商品は", max_tokens=16, temperature=0).choices[0].text
    stop = free[3:5]
    cut = c.completions.create(model="alpaca", prompt="この商品は", max_tokens=16, temperature=0,
                               stop=[stop, "zz"])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_answers_are_what_generate_prints(api, serving, capsys):
    """/v1/answers for each model against `python -m minicalm generate` with the same adapter and text: the answer (or
    invalid), the text written, each label word's probability; a free-form task's answer."""
    from minicalm.tools.commands import main
    url, _ = api
    folder, _, dirs = serving
    texts = ["この商品は最高です。", "二度と買いません。"]
    for name, adapter in [(str(folder), None), *dirs.items()]:
        main(["generate", "--model", str(folder), "--device", "cpu", *(["--adapter", str(adapter)] if adapter else []),
                       *texts])
        printed = capsys.readouterr().out.split("\n")[:-1]   # (not splitlines: a random model writes \x0c and such)
        for text, line in zip(texts, printed):
            got = httpx2.post(f"{url}/v1/answers", json={"model": name, "text": text}, timeout=60).json()
            if name == "alpaca":   # free-form: the answer, then the text
                assert line == f"{got['answer']}\t{text}".replace("\n", "\\n") and got["probabilities"] is None
                continue
            answer, written, probs, echoed = line.split("\t")
            assert (got["answer"] or "invalid", repr(got["text"]), echoed) == (answer, written, text)
            shown = dict(p[2:].split(")=") for p in probs.split())
            assert got["probabilities"].keys() == shown.keys()
            assert all(abs(got["probabilities"][k] - float(v)) <= 5.1e-4 for k, v in shown.items())
        if name == "alpaca":   # an instruction and an input: tab-separated as generate takes them, or by name
            both = {"instruction": "この文章の最初の文を書いて。", "input": texts[0]}
            tabbed = httpx2.post(f"{url}/v1/answers", json={"model": name, "text": "\t".join(both.values())}).json()
            assert tabbed == httpx2.post(f"{url}/v1/answers", json={"model": name, **both}).json()
        streamed = httpx2.post(f"{url}/v1/answers", json={"model": name, "text": texts[0], "stream": True},
                               timeout=60).text.split("\n\n")
        final = json.loads(streamed[-3][6:])
        assert streamed[-2] == "data: [DONE]" and final == httpx2.post(
            f"{url}/v1/answers", json={"model": name, "text": texts[0]}, timeout=60).json()


QUESTION = {"question": "この商品を買った人はどう感じた？", "choice0": "満足", "choice1": "不満", "choice2": "配送",
            "choice3": "色", "choice4": "説明書"}


def question_adapter(serving, out):
    """An adapter of JCommonsenseQA's task (a question and five choices) for the served base."""
    from minicalm.tasks.task import JCOMMONSENSEQA
    return make_adapter(serving[0], out, LoraConfig(r=4, alpha=8, targets=("query_key_value",)), 7, JCOMMONSENSEQA)


def test_a_multiple_choice_question_is_answered_as_generate_answers_it(serving, tmp_path, capsys):
    """A model whose task answers with one of the row's choices: /v1/answers takes the question and its choices
    (tab-separated as generate takes them, or by name) and gives the greedy answer's choice (its index), what was
    written and each choice's probability, as `python -m minicalm generate` prints them; an empty choice is a 400
    naming it, as generate refuses it."""
    from minicalm.tools.commands import main
    folder = serving[0]
    adapter = question_adapter(serving, tmp_path / "jcqa")
    text = "\t".join(QUESTION.values())
    main(["generate", "--model", str(folder), "--adapter", str(adapter), "--device", "cpu", text])
    answer, written, probs, echoed = capsys.readouterr().out.removesuffix("\n").split("\t", 3)
    with running(ServeConfig(model=str(folder), adapter=[f"jcqa={adapter}"], port=0, device="cpu")) as (url, _):
        got = httpx2.post(f"{url}/v1/answers", json={"model": "jcqa", "text": text}, timeout=60).json()
        by_name = httpx2.post(f"{url}/v1/answers", json={"model": "jcqa", **QUESTION}, timeout=60).json()
        empty = httpx2.post(f"{url}/v1/answers", json={"model": "jcqa", **QUESTION, "choice3": " "}, timeout=60)
        listed = {m.id: m for m in client(url).models.list().data}   # it answered 500 with such a model served
    jcqa = listed["jcqa"]
    assert (jcqa.task, jcqa.labels, jcqa.fields) == ("jcommonsenseqa", None, list(QUESTION))
    assert got == by_name and got["choices"] == list(QUESTION.values())[1:]
    assert ("invalid" if got["answer"] is None else str(got["answer"]), repr(got["text"]), echoed) == \
           (answer, written, text)
    shown = [float(p.split(")=")[1]) for p in probs.split()]
    assert len(got["probabilities"]) == 5 and all(abs(a - b) <= 5.1e-4 for a, b in zip(got["probabilities"], shown))
    error = empty.json()["error"]
    assert (empty.status_code, error["param"], error["message"]) == (400, "text", "text: choice3 is empty: a question "
                                                                     "of task jcommonsenseqa gives a text for each of "
                                                                     "its choices (choice0, choice1, choice2, choice3, "
                                                                     "choice4)")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), "--adapter", str(adapter), "--device", "cpu",
              text.replace("\t色\t", "\t\t")])
    assert e.value.code == 1 and "choice3 is empty" in capsys.readouterr().err


def test_32_clients_at_once_each_get_their_answer_alone(api, twin):
    """32 concurrent clients x 4 requests over the base and the three adapters, some streamed: nothing lost, each
    answer its answer alone."""
    url, _ = api
    _, tok, names = twin
    c = client(url)
    g = torch.Generator().manual_seed(11)
    jobs, wants = [], []
    while len(jobs) < 128:   # 32 clients x 4 requests, each with a greedy path free of near-ties
        k, j = divmod(len(jobs), 4)
        L, n = int(torch.randint(2, 60, (1,), generator=g)), int(torch.randint(4, 24, (1,), generator=g))
        job = (names[(k + j) % 4], torch.randint(2, tok.vocab_size, (L,), generator=g).tolist(), n, j % 2)
        want, gap = greedy_alone(twin, *job[:3])
        if gap > NEAR_TIE:
            jobs.append(job), wants.append(want)

    def ask(job):
        model_id, prompt, n, stream = job
        if not stream:
            return c.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0).choices[0].text
        return "".join(ch.choices[0].text for ch in c.completions.create(model=model_id, prompt=prompt, max_tokens=n,
                                                                         temperature=0, stream=True))
    t0 = time.time()
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, jobs))
    print(f"128 requests from 32 clients in {time.time() - t0:.1f} s")
    for want, text in zip(wants, got):
        assert text == answer_text(tok, want)


def test_each_fault_gets_its_4xx_and_the_next_request_is_served(api):
    url, _ = api
    c = client(url)
    ok = dict(model="marc", prompt="この", max_tokens=2, temperature=0)

    def error(status, **body):
        r = httpx2.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == status, r.text
        assert c.completions.create(**ok).choices[0].finish_reason == "length"   # the next one is served
        return r.json()["error"]

    assert error(400, **ok | {"max_tokens": "5"}) == {
        "message": 'max_tokens: expected an integer >= 1, got "5"', "type": "invalid_request_error",
        "param": "max_tokens", "code": 400}
    assert error(400, **ok | {"max_tokens": 0})["param"] == "max_tokens"
    assert error(400, **ok | {"temperature": -1})["param"] == "temperature"
    assert error(400, **ok | {"prompt": [3, "x"]})["param"] == "prompt"
    assert error(400, **ok | {"max_tokens": True})["param"] == "max_tokens"
    assert "a prompt of 1 tokens plus max_tokens 300: 301 tokens, past the model's 256 positions" in error(
        400, **ok | {"prompt": [5], "max_tokens": 300})["message"]
    long = error(400, **ok | {"prompt": "良い商品です。" * 14_286})   # 100,000 characters
    assert long["param"] == "max_tokens" and "past the model's 256 positions" in long["message"]
    missing = error(404, **ok | {"model": "no-such"})
    assert missing["message"].startswith("the model 'no-such' does not exist; served here: ")
    assert missing["message"].endswith("marc, marc-rs, alpaca") and missing["type"] == "not_found_error"
    for raw, status, says in ((b'{"model": "marc", "prompt": ', 400, "the body is not JSON"),
                              (b"[1, 2]", 400, "the body must be a JSON object"),
                              (b'{"model": "marc", "prompt": "' + b"a" * (20 * 2**20) + b'"}', 413,   # 20 MB
                               "exceed the limit")):
        r = httpx2.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == status and says in r.json()["error"]["message"]
        assert c.completions.create(**ok).choices[0].finish_reason == "length"
    bad = httpx2.post(f"{url}/v1/answers", json={"model": "marc", "sentence": ""}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["message"] == (
        "text: required (or the fields of model marc's task marc-ja by name: sentence)")
    with pytest.raises(openai.BadRequestError, match="max_tokens: expected an integer >= 1, got -3"):
        c.completions.create(model="marc", prompt="x", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="../etc", prompt="x")


def test_a_client_gone_mid_stream_frees_its_row_at_once(api):
    url, server = api
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        body = json.dumps({"model": "alpaca", "prompt": "この", "max_tokens": 200, "temperature": 0, "stream": True})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  f"{len(body)}\r\n\r\n{body}".encode())
        got = b""
        while b"data: " not in got:   # the headers, then the first event: streaming has begun
            got += s.recv(4096)
        req = server.engine.running[0]
    deadline = time.time() + 5
    while server.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert not server.engine.running and req.finish_reason == "cancelled" and len(req.tokens) < 200
    assert client(url).completions.create(model="marc", prompt="この", max_tokens=2).choices[0].text is not None


def test_a_client_gone_before_its_answer_is_cancelled(api):
    """Without streaming too: a request whose client closes the connection ends ("cancelled") without running."""
    url, server = api
    gate = threading.Event()
    server.engine.call(gate.wait)   # the engine's thread waits: the request stays queued while its client leaves
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        body = json.dumps({"model": "marc", "prompt": "この", "max_tokens": 50, "temperature": 0})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                  f"{len(body)}\r\n\r\n{body}".encode())
        deadline = time.time() + 5
        while not server.engine.waiting and time.time() < deadline:
            time.sleep(0.01)
        req = server.engine.waiting[0]
    while not req.cancelled and time.time() < deadline:   # the server saw the client go
        time.sleep(0.01)
    gate.set()
    assert req.result(timeout=10).finish_reason == "cancelled" and req.tokens == []


def test_a_full_queue_is_503_with_retry_after_and_a_key_guards_the_api(serving, monkeypatch):
    monkeypatch.setenv("MINICALM_API_KEY", "sesame")
    with running(config(serving, max_batch=1, max_queue=1)) as (url, server):
        key = {"Authorization": "Bearer sesame"}
        assert httpx2.get(f"{url}/v1/models", timeout=10).status_code == 401
        wrong = httpx2.post(f"{url}/v1/completions", json={"model": "marc", "prompt": "x"},
                            headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").models.list()
        assert client(url, "sesame").models.list().data
        gate = threading.Event()
        server.engine.call(gate.wait)   # the engine's thread waits at the gate: requests queue up before it
        ask = dict(json={"model": "marc", "prompt": "x", "max_tokens": 2}, headers=key, timeout=60)
        second = threading.Thread(target=httpx2.post, args=(f"{url}/v1/completions",), kwargs=ask)
        second.start()
        deadline = time.time() + 10
        while not server.engine.waiting and time.time() < deadline:   # the queue's one place is taken
            time.sleep(0.01)
        full = httpx2.post(f"{url}/v1/completions", **ask)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["message"] == ("the server is busy (1 requests are waiting already); retry in a "
                                                   "moment")
        gate.set()
        second.join(timeout=60)
        done = httpx2.post(f"{url}/v1/completions", json={"model": "marc", "prompt": "x", "max_tokens": 2},
                           headers=key, timeout=60)
        assert done.status_code == 200


# ----------------------------------------------------------------------------- the command

def serve_cli(*args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minicalm", "serve", "--device", "cpu", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_ends_the_streams_in_flight_cleanly_and_exits_0(serving, sig):
    folder, _, dirs = serving
    proc = serve_cli("--model", str(folder), "--adapter", f"alpaca={dirs['alpaca']}", "--port", "0")
    line = proc.stdout.readline()
    assert "127.0.0.1:" in line, proc.stderr.read()
    url = "http://" + line.split("http://")[1].split()[0]
    chunks = []
    with httpx2.stream("POST", f"{url}/v1/completions", json={"model": "alpaca", "prompt": "この", "max_tokens": 230,
                                                                "temperature": 0, "stream": True}, timeout=60) as r:
        for ln in r.iter_lines():
            if ln and not chunks:
                proc.send_signal(sig)
                t0 = time.time()
            chunks += [ln] if ln else []
    assert proc.wait(timeout=20) == 0
    print(f"exit 0 {time.time() - t0:.1f} s after {sig.name}")
    assert time.time() - t0 < SHUTDOWN_GRACE + 5
    assert chunks[-1] == "data: [DONE]" and json.loads(chunks[-2][6:])["choices"][0]["finish_reason"] in (
        "length", "stop", "abort")
    with pytest.raises(httpx2.ConnectError):   # it no longer accepts
        httpx2.get(f"{url}/health", timeout=5)


@pytest.mark.parametrize("flags, says", [
    (["--adapter", "marc"], "--adapter: expected NAME=DIR"),
    (["--adapter", "a b=x"], "--adapter: expected NAME=DIR"),
    (["--adapter", "m={marc}", "--adapter", "m={alpaca}"], "--adapter: the model id 'm' is given twice"),
    (["--adapter", "m={dora}"], "a DoRA adapter cannot share a batch with other adapters"),
    (["--adapter", "m={other}"], "was trained on"),
    (["--adapter", "m=/no/such"], "/no/such: no adapter here"),
    (["--port", "{busy}"], "--port: cannot listen on 127.0.0.1:"),
    (["--max-batch", "0"], "--max-batch: must be at least 1, got 0"),
], ids=["no-dir", "bad-name", "twice", "dora", "other-base", "missing", "port-in-use", "max-batch"])
def test_the_command_refuses_bad_settings_in_one_line(serving, tmp_path, flags, says, capsys):
    """Each refused before the model loads: one line naming the flag, exit status 1."""
    from minicalm.tools.commands import main
    folder, _, dirs = serving
    dora = make_adapter(folder, tmp_path / "dora", LoraConfig(r=2, use_dora=True), seed=3)
    other = make_adapter(folder, tmp_path / "other", LoraConfig(r=2), seed=3)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "someone/else"}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        subs = dict(marc=dirs["marc"], alpaca=dirs["alpaca"], dora=dora, other=other, busy=busy.getsockname()[1])
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", str(folder), "--device", "cpu", *(f.format(**subs) for f in flags)])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and out == "", err
    assert err.startswith("python -m minicalm serve: error: ") and err.count("\n") == 1 and says in err, err


def test_without_fastapi_the_command_says_what_to_install(serving):
    """The library imports without the serve extra; the command says in one line what to install."""
    code = ("import sys; sys.modules['fastapi'] = None; import minicalm, minicalm.engine, minicalm.tools.serve; "
            "from minicalm.tools.commands import main; main(['serve', '--model', 'x'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == (
        "python -m minicalm serve: error: python -m minicalm serve needs FastAPI and uvicorn: pip install "
        "'minicalm[serve]' (or pip install fastapi uvicorn)\n")


def test_it_binds_localhost_unless_told():
    assert ServeConfig().host == "127.0.0.1"
    assert math.isclose(ServeConfig().max_body, 4 * 2**20)


def test_the_readme_s_calls_run_as_written(api, serving):
    """The README's curl calls and openai snippet (its "Serve and compare" section), run against the test server:
    only the address changes."""
    import re
    url, _ = api
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Serve and compare")[1].split("\n## ")[0]
    curl = re.search(r"```bash\n(curl .*?)```", section, re.S)[1].replace("http://127.0.0.1:8000", url)
    if shutil.which("curl") is None:
        pytest.skip("curl is absent")
    calls = [c for c in curl.replace("\\\n", " ").splitlines() if c.strip()]
    outs = [json.loads(subprocess.run(["bash", "-c", c], capture_output=True, text=True, check=True).stdout)
            for c in calls]
    assert outs[0]["object"] == "text_completion" and outs[0]["usage"]["completion_tokens"] >= 1
    assert outs[1]["object"] == "answer" and outs[1]["probabilities"].keys() == {"positive", "negative"}
    code = re.search(r"```python\n(from openai import OpenAI.*?)```", section, re.S)[1]
    done = subprocess.run([sys.executable, "-c", code.replace("http://127.0.0.1:8000", url)], capture_output=True,
                          text=True, timeout=60)
    listed, streamed = done.stdout.split("\n", 1)
    assert done.returncode == 0 and eval(listed) == [str(serving[0]), "marc", "marc-rs", "alpaca"], done.stderr
    whole = client(url).completions.create(model="marc", prompt="日本の首都は", max_tokens=16, temperature=0)
    assert streamed == whole.choices[0].text
