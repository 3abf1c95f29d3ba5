"""Continuous batching (minicalm/engine.py): requests that join and leave a running batch, each row on its own adapter,
answer token for token what each answers alone through generate.py's static path (greedy_generate at batch 1, itself
checked against transformers); the cache's keys move left and right as rows come and go; a cancelled request frees its
row at the next step; the queue has a bound; echoed log-probabilities are the model's own.

Tokens are compared exactly. The rows beside a request change the shapes its matmuls run at, so its logits differ
from those it gets alone in the last bits; the test measures that difference and the smallest gap between the two
likeliest tokens over every step, and checks the gap is far wider, so no argmax can flip on any CPU kernel set."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import assert_close_to_scale
from minicalm import greedy_generate, load_model
from minicalm.engine import Closed, Engine, QueueFull, Request, held_back
from minicalm.generate import sampler
from minicalm.io.adapter import load_adapters
from minicalm.multi_lora import row_adapters


@pytest.fixture(scope="module")
def served(serving):
    """The serving checkpoint with its three adapters loaded side by side; (model, tokenizer, adapter names)."""
    folder, tok, dirs = serving
    model = load_model(folder).eval()
    return model, tok, ["base", *load_adapters(model, dirs)]


def mixed_requests(tok, n: int, seed: int = 0, **settings) -> list[Request]:
    """n requests over the base and the three adapters: prompts of 3 to 200 tokens, 6 to 50 new tokens, so that rows
    end at different steps (others join in their place) and the slot meets the end of the 256-slot cache. The first
    six prompts are short, so that a long one comes while the slot is still small."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(3, 200 if i >= 6 else 12, (1,), generator=g))
        prompt = torch.randint(2, tok.vocab_size, (L,), generator=g).tolist()
        m = int(torch.randint(6, min(50, 256 - L) + 1, (1,), generator=g))
        out.append(Request(prompt, max_tokens=m, adapter=i % 4, logprobs=2, **settings))
    return out


def alone(model, tok, req: Request) -> list[int]:
    """The request's greedy answer by itself, through the static path: greedy_generate at batch 1 on its adapter."""
    with row_adapters(model, torch.tensor([req.adapter])):
        out = greedy_generate(model, torch.tensor([req.prompt]), req.max_tokens, eos_token_id=tok.eos_token_id)
    new = out[0, len(req.prompt):].tolist()
    return new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def test_each_request_answers_as_it_would_alone(served, monkeypatch):
    model, tok, names = served
    moves = []
    move = Engine.move
    monkeypatch.setattr(Engine, "move", lambda self, d: (moves.append(d), move(self, d)))
    engine = Engine(model, tok, max_batch=6)
    reqs = engine.generate(mixed_requests(tok, 20))
    for i, req in enumerate(reqs):
        want = alone(model, tok, req)
        assert req.tokens == want, f"request {i} ({names[req.adapter]}, prompt {len(req.prompt)} tokens)"
        assert req.finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
        assert req.text == engine.text(req.tokens)
    assert {r.adapter for r in reqs} == {0, 1, 2, 3} and len({tuple(r.tokens) for r in reqs}) > 10
    assert min(moves) < 0 < max(moves)   # the keys moved left (compacted) and right (for a long prompt)
    assert engine.running == [] and not engine.waiting

    # why exact equality holds: the logits beside others differ from those alone by far less than half the gap
    # between the two likeliest tokens at any step (log-probabilities: logits less their log-sum-exp)
    solo = Engine(model, tok, max_batch=1)
    gaps, diffs = [], []
    for req in reqs:
        mine = drain(req)
        theirs = drain(solo.generate([Request(req.prompt, req.max_tokens, req.adapter, logprobs=2)])[0])
        assert [e.tokens for e in mine] == [e.tokens for e in theirs]
        for a, b in zip(mine, theirs):
            top = sorted(b.top[0].values(), reverse=True)
            gaps.append(top[0] - top[1])
            diffs.append(abs(a.logprobs[0] - b.logprobs[0]))
    print(f"smallest top-2 gap {min(gaps):.2e}, largest difference beside others {max(diffs):.2e} (log-probabilities)")
    assert max(diffs) * 20 < min(gaps)


def drain(req: Request) -> list:
    """The token events a request received, in order."""
    events = []
    while not req.events.empty():
        e = req.events.get()
        if e.tokens:
            events.append(e)
    return events


def test_sampled_requests_draw_the_same_tokens_beside_others(served):
    """A seeded sampler per request (temperature, top-k, top-p): the same draws alone and in a full batch."""
    model, tok, _ = served
    def reqs():
        out = mixed_requests(tok, 8, seed=3)
        for i, req in enumerate(out):
            g = torch.Generator().manual_seed(100 + i)
            req.pick = sampler(0.8 + 0.1 * (i % 3), top_k=50 if i % 2 else None, generator=g, top_p=0.9)
        return out
    together = Engine(model, tok, max_batch=8).generate(reqs())
    by_itself = [Engine(model, tok, max_batch=1).generate([req])[0] for req in reqs()]
    assert [r.tokens for r in together] == [r.tokens for r in by_itself]
    greedy = Engine(model, tok, max_batch=8).generate(mixed_requests(tok, 8, seed=3))
    assert [r.tokens for r in together] != [r.tokens for r in greedy]   # it did sample


def test_a_cancelled_request_frees_its_row_at_the_next_step_and_the_others_go_on(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_batch=2)
    long, other, queued = (Request(list(range(5, 15)), max_tokens=200, adapter=a) for a in (1, 2, 3))
    for req in (long, other, queued):
        engine.submit(req)
    for _ in range(3):
        engine.step()
    assert engine.running == [long, other] and len(long.tokens) == 4 and list(engine.waiting) == [queued]
    long.cancel()
    engine.step()
    assert long.finish_reason == "cancelled" and len(long.tokens) == 4           # nothing after the cancel
    assert engine.running == [other, queued] and len(queued.tokens) == 2         # joined in the freed row at once
    while engine.running:
        engine.step()
    assert other.tokens == alone(model, tok, other) and queued.tokens == alone(model, tok, queued)


def test_the_queue_has_a_bound_and_a_closed_engine_takes_nothing(served):
    model, tok, _ = served
    engine = Engine(model, tok, max_batch=1, max_queue=3)
    engine.submit(Request([5, 6], 3), Request([7], 3))
    with pytest.raises(QueueFull, match="2 requests are waiting already"):
        engine.submit(Request([8], 3), Request([9], 3))   # all or none: a request's choices go in together
    engine.submit(Request([8], 3))
    with pytest.raises(QueueFull, match="3 requests are waiting already"):
        engine.submit(Request([9], 3))
    assert len(engine.waiting) == 3
    with pytest.raises(ValueError, match="a prompt of 250 tokens and max_tokens 7: .* at most the model's 256"):
        engine.submit(Request([5] * 250, 7))
    engine.close()
    with pytest.raises(Closed):
        engine.submit(Request([5], 3))
    engine.run()   # closed: runs what it holds to the end, then returns
    assert not engine.waiting and not engine.running
    stopping = Engine(model, tok, max_batch=1)   # a shutdown's grace over: what runs and waits ends, "abort"
    running, waiting = Request([5, 6], 100), Request([7], 3)
    stopping.submit(running, waiting)
    stopping.step(), stopping.step()
    stopping.close(abort=True)
    stopping.run()
    assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort") and len(running.tokens) == 3


def test_the_engine_thread_serves_threads_that_submit_at_once(served):
    """16 threads submit together to the engine's thread (a queue and a batch of 6): every answer as it is alone."""
    model, tok, _ = served
    engine = Engine(model, tok, max_batch=6, max_queue=16).start()
    reqs = mixed_requests(tok, 16, seed=7)
    threads = [threading.Thread(target=engine.submit, args=(req,)) for req in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for req in reqs:
        req.result(timeout=120)
    engine.close()
    engine.thread.join(timeout=10)
    assert not engine.thread.is_alive()
    for req in reqs:   # the model is the engine thread's while it runs: the answers alone come after
        assert req.tokens == alone(model, tok, req)


def test_stop_strings_end_the_text_before_them_and_nothing_of_them_is_sent(served):
    model, tok, _ = served
    free = Engine(model, tok).generate([Request(tok.encode("この商品は"), max_tokens=40)])[0]
    text = free.text
    stop = text[10:13]   # a string the model writes, spread over tokens or not
    req = Engine(model, tok).generate([Request(tok.encode("この商品は"), max_tokens=40, stop=(stop, "never"))])[0]
    assert req.finish_reason == "stop" and req.text == text[:text.index(stop)]
    sent = "".join(e.text for e in drain_all(req))
    assert sent == req.text


def drain_all(req: Request) -> list:
    events = []
    while not req.events.empty():
        events.append(req.events.get())
    return events


def test_held_back_keeps_what_may_begin_a_stop_string_or_a_character():
    assert held_back("abc", ()) == 0
    assert held_back("ab\ufffd", ()) == 1                    # a character whose bytes are not all there yet
    assert held_back("xx##", ("###",)) == 2 and held_back("xx#", ("###", "#!")) == 1
    assert held_back("abab", ("abab!",)) == 4


def test_echo_gives_the_prompt_s_log_probabilities_as_the_model_computes_them(served):
    """With echo the first event holds the prompt's tokens, each with its log-probability after the tokens before it
    (the first: None) and its top alternatives: log_softmax of the model's logits over the whole prompt."""
    model, tok, _ = served
    prompt = tok.encode("この商品は最高です。また買います。")
    req = Engine(model, tok).generate([Request(prompt, max_tokens=2, adapter=2, logprobs=3, echo=True)])[0]
    first = drain_all(req)[0]
    assert first.echo and first.tokens == prompt and first.text == tok.decode(prompt)
    with torch.no_grad(), row_adapters(model, torch.tensor([2])):
        lp = model(torch.tensor([prompt]))[0].log_softmax(-1)
    want = lp[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert first.logprobs[0] is None and first.top[0] is None
    assert_close_to_scale(torch.tensor(first.logprobs[1:]), want)
    for j, top in enumerate(first.top[1:]):
        assert prompt[j + 1] in top and len(top) in (3, 4)   # the top 3, and the token itself when not among them
