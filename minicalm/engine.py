"""Continuous batching: one running batch that requests join and leave at every decoding step (Orca's iteration-level
scheduling, Yu et al., OSDI 2022), over generate.py's one decoding path, each row on its own adapter (multi_lora.py).

    submit(Request) -> waiting (bounded) -> admit: a prefill into a free row -> running rows [0, n) -> decode_one_token
                                                                                   ^  one token per row per step   |
                                                                                   +-- a row that is done leaves --+

A static batch (evaluate.py) runs until its longest answer ends and starts nothing new before; here a request starts
at the step after it arrives and leaves at the step it ends, so short answers never wait for long ones and the batch
stays full under load. nano-vllm (GeeeekExplorer/nano-vllm) runs the same loop over a paged cache; this one keeps
generate.py's cache: one KVCache of max_batch rows x S slots (S: the model's positions), allocated once. Its rows
share one write slot (Decoding.slot), so each row's keys lie right-aligned before it:

    slot     0 1 2 3 4 5 6 7 8 9 ...   S-1
    row 0    . . p p p p g g g|          a prompt of 4 (p) and 3 tokens generated (g); '.': key_valid False
    row 1    . . . . . . p p p|          joined later: its prompt's keys copied in to end at the slot
                              ^ slot: every row writes its next token here

A request joins through a prefill of its own into a small cache (no padding to compute, and its keys depend on nothing
that runs beside it), whose keys are then copied into its row. The keys move left (`move`) when the slot reaches S or
when most slots before it belong to no running row any more, and right when a prompt is longer than the slot. Rows
stay packed at [0, n): a row that leaves takes the last one into its place, so a step computes running rows only.
Each row keeps its own rotary positions (Decoding.positions), so where its keys lie in the cache changes nothing it
computes: a request's tokens depend on its prompt, adapter and sampling settings (a seeded sampler of its own), not on
the rows beside it (those change only the shapes the matmuls run at, hence the last bits of its logits).

The engine runs on a thread of its own (`start`; `submit` from any thread, events back through a callback) or step by
step without one (`generate`). It knows tokens; the tokenizer only turns them into text (stop strings, text sent
back). HTTP lives in tools/serve.py.
"""
from __future__ import annotations

import copy
import queue
import sys
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from .generate import Decoding, decode_one_token, prefill
from .model import CalmForCausalLM, KVCache, LayerKV
from .multi_lora import row_adapters


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: come back later."""


class Closed(RuntimeError):
    """The engine takes no more requests: it is shutting down."""


@dataclass
class Event:
    """What a step gives one request."""
    tokens: list[int]                    # the new token (with `echo`, a first event brings the prompt's tokens)
    text: str                            # the text they add: "" while a character's bytes are incomplete, or while it
                                         # may be the start of a stop string
    logprobs: list[float | None]         # each token's log-probability (None for the prompt's first); with logprobs
    top: list[dict[int, float] | None]   # each token's likeliest alternatives (token id: log-probability)
    finish_reason: str | None = None     # on the last event: stop, length, cancelled, abort or error
    echo: bool = False                   # the prompt's tokens, echoed


@dataclass(eq=False)
class Request:
    """A prompt to continue and how; the engine fills in what it wrote."""
    prompt: list[int]                          # token ids, at least one
    max_tokens: int = 16                       # tokens to generate at most
    adapter: int = 0                           # the rows' adapter (multi_lora's index; 0: the base)
    pick: Callable | None = None               # logits (V,) -> token; None: greedy; generate.sampler samples
    stop_ids: frozenset[int] = frozenset()     # tokens that end the answer besides EOS (a task's line ends)
    leading_ids: frozenset[int] = frozenset()  # stop ids that end it only after another token (a leading blank line)
    stop: tuple[str, ...] = ()                 # strings that end the answer; the text before the first is kept
    logprobs: int | None = None                # each token's log-probability and its top-N alternatives
    echo: bool = False                         # the prompt's tokens and their log-probabilities, before the answer
    on_event: Callable[[Event], None] | None = None   # called on the engine's thread; default: put into `events`
    tokens: list[int] = field(default_factory=list)   # the engine's record: the tokens generated (EOS included)
    text: str = ""                                    # the text sent so far
    finish_reason: str | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: str | None = None               # why it was cancelled: the engine ends it at its next step
    started: bool = False                      # whether a token that is not a leading id has come
    finished: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str = "cancelled") -> None:
        """End it at the engine's next step (a client gone); its row is freed then."""
        self.cancelled = self.cancelled or reason

    def result(self, timeout: float | None = None) -> "Request":
        if not self.finished.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return self


def rows_of(cache: KVCache, n: int) -> KVCache:
    """The first n rows of a cache, as views: what the model writes into them lands in the cache itself."""
    view = copy.copy(cache)
    view.layers = [LayerKV(kv.k[:n], kv.v[:n]) for kv in cache.layers]
    view.key_valid = cache.key_valid[:n]
    return view


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text to hold back: an incomplete character (U+FFFD while its bytes are not
    all there) and the longest end that could begin a stop string."""
    whole = text.rstrip("\ufffd")
    begun = (k for s in stops for k in range(1, len(s)) if whole.endswith(s[:k]))
    return len(text) - len(whole) + max(begun, default=0)


class Engine:
    """One running batch over a preallocated cache of max_batch rows, and a queue of at most max_queue before it."""

    def __init__(self, model: CalmForCausalLM, tok, max_batch: int = 8, max_queue: int = 64):
        self.model, self.tok, self.max_batch, self.max_queue = model, tok, max_batch, max_queue
        self.S = model.config.max_position_embeddings
        self.device = device = model.gpt_neox.embed_in.weight.device
        self.cache = model.new_cache(max_batch, self.S, torch.ones(max_batch, self.S, dtype=torch.bool, device=device))
        self.columns = torch.arange(self.S, device=device)
        long = dict(dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, **long)   # each row's last rotary position
        self.last = torch.zeros(max_batch, **long)        # each row's last token: the next step's input
        self.adapters = torch.zeros(max_batch, **long)    # each row's adapter
        self.running: list[Request] = []                  # row i runs running[i]
        self.slot = 0
        self.waiting: deque[Request] = deque()
        self.jobs: deque[tuple[Callable, Future]] = deque()
        self.lock = threading.Condition()
        self.accepting, self.thread = True, None

    # ------------------------------------------------------------------------- from any thread

    def check(self, req: Request) -> Request:
        if not req.prompt or req.max_tokens < 1 or len(req.prompt) + req.max_tokens > self.S:
            raise ValueError(f"a prompt of {len(req.prompt)} tokens and max_tokens {req.max_tokens}: both at least 1, "
                             f"together at most the model's {self.S} positions")
        return req

    def submit(self, *reqs: Request) -> None:
        """Queue requests (all or none); they join the running batch at a step soon after. QueueFull past the bound,
        Closed when shutting down."""
        for req in reqs:
            self.check(req)
        with self.lock:
            if not self.accepting:
                raise Closed("the engine is shutting down")
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(reqs)
            self.lock.notify()

    def call(self, fn: Callable) -> Future:
        """Run fn() on the engine's thread between two steps (it then has the model to itself); its result later."""
        future: Future = Future()
        with self.lock:
            self.jobs.append((fn, future))
            self.lock.notify()
        return future

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self.run, name="minicalm-engine", daemon=True)
        self.thread.start()
        return self

    def close(self, abort: bool = False) -> None:
        """Take no more requests; the thread ends once those it has are done (abort: ended now, reason "abort")."""
        with self.lock:
            self.accepting = False
            for req in (*self.running, *self.waiting) if abort else ():
                req.cancel("abort")
            self.lock.notify()

    def run(self) -> None:
        """The engine thread's loop: a step while there is work, a wait while there is none, until closed and done."""
        while True:
            with self.lock:
                while self.accepting and not (self.waiting or self.running or self.jobs):
                    self.lock.wait()
                if not (self.accepting or self.waiting or self.running or self.jobs):
                    return
            try:
                self.step()
            except Exception:   # a failed step ends the requests it held, not the engine
                traceback.print_exc(file=sys.stderr)
                for req in self.running:
                    self.send(req, Event([], "", [], [], "error"))
                self.running, self.slot = [], 0

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run requests to their end on this thread, in one continuous batch (no server, no queue bound)."""
        with self.lock:
            self.waiting.extend(map(self.check, requests))
        while not all(req.finish_reason for req in requests):
            self.step()
        return requests

    # ------------------------------------------------------------------------- the engine's thread

    @torch.inference_mode()
    def step(self) -> None:
        """Jobs first; then cancelled rows leave, waiting requests join (a prefill), every running row gets a token."""
        while self.jobs:
            fn, future = self.jobs.popleft()
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
        for r in reversed(range(len(self.running))):
            if self.running[r].cancelled:
                self.end(self.running[r], self.running[r].cancelled)
                self.leave(r)
        self.admit()
        if self.running:
            self.decode()

    def admit(self) -> None:
        """Free rows take waiting requests, in order of arrival: each a prefill of its own, then its first token."""
        while self.waiting and len(self.running) < self.max_batch:
            with self.lock:
                req = self.waiting.popleft()
            if req.cancelled:
                self.end(req, req.cancelled)
            else:
                self.join(req)

    def join(self, req: Request) -> None:
        """A request into the next free row: its prompt's prefill (by itself: no padding to compute, and its keys do
        not depend on what else arrives), copied into the row to end at the slot; then its first token."""
        n, r = len(req.prompt), len(self.running)
        with row_adapters(self.model, torch.tensor([req.adapter], device=self.device)):
            logits, state = prefill(self.model, torch.tensor([req.prompt], device=self.device), extra=0,
                                    every=req.echo)                                 # (1, V), or (1, n, V) with echo
        if not self.running:
            self.slot = n
        elif self.slot < n:   # room on the left for the prompt
            self.move(n - self.slot)
        self.running.append(req)
        for mine, theirs in zip(self.cache.layers, state.cache.layers):
            mine.k[r, :, self.slot - n:self.slot], mine.v[r, :, self.slot - n:self.slot] = theirs.k[0], theirs.v[0]
        self.cache.key_valid[r] = self.columns >= self.slot - n
        self.positions[r], self.adapters[r] = n - 1, req.adapter
        if req.echo:
            self.echo(req, logits[0])
        if self.take(r, logits[0, -1] if req.echo else logits[0]):
            self.leave(r)

    def decode(self) -> None:
        """One token for every running row: generate.py's decode step over the cache's first n rows."""
        n, width = len(self.running), self.width()
        if self.slot == self.S or self.slot - width > width:   # no room left, or more dead slots than live ones
            self.move(width - self.slot)
        state = Decoding(rows_of(self.cache, n), self.positions[:n], self.slot)
        with row_adapters(self.model, self.adapters[:n]):
            logits = decode_one_token(self.model, self.last[:n], state)    # (n, V)
        self.positions[:n], self.slot = state.positions, state.slot
        best = logits.argmax(-1).tolist()   # the greedy rows' tokens, in one transfer
        done = [r for r in range(n) if self.take(r, logits[r], best[r])]
        for r in reversed(done):
            self.leave(r)

    def width(self) -> int:
        """The slots the longest running row holds: its prompt and every token but the last (the next input)."""
        return max(len(req.prompt) + len(req.tokens) - 1 for req in self.running)

    def move(self, d: int) -> None:
        """Move the running rows' keys d slots (left when d < 0) with the slot; what lies before them is padding."""
        n, lo = len(self.running), self.slot - self.width()
        for kv in self.cache.layers:
            for t in (kv.k, kv.v):
                t[:n, :, lo + d:self.slot + d] = t[:n, :, lo:self.slot].clone()
        valid = self.cache.key_valid
        valid[:n, lo + d:self.slot + d] = valid[:n, lo:self.slot].clone()
        valid[:n, :lo + d], valid[:n, self.slot + d:] = False, True
        self.slot += d

    def leave(self, r: int) -> None:
        """Free row r: the last running row moves into it, so that the running rows stay [0, n)."""
        last = len(self.running) - 1
        if r != last:
            for kv in self.cache.layers:
                kv.k[r, :, :self.slot], kv.v[r, :, :self.slot] = kv.k[last, :, :self.slot], kv.v[last, :, :self.slot]
            for t in (self.cache.key_valid, self.positions, self.last, self.adapters):
                t[r] = t[last]
            self.running[r] = self.running[last]
        self.running.pop()

    def take(self, r: int, logits: torch.Tensor, best: int | None = None) -> bool:
        """Row r's next token from its logits (V,) (`best`: their argmax, if known): recorded, its text sent; whether
        the request is done."""
        req = self.running[r]
        token = int(req.pick(logits)) if req.pick else int(logits.argmax()) if best is None else best
        self.last[r] = token
        req.tokens.append(token)
        lead = token in req.leading_ids
        reason = "stop" if (token == self.tok.eos_token_id or token in req.stop_ids) and (req.started or not lead) \
            else None
        req.started |= not lead
        text = self.text(req.tokens)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(req.tokens) == req.max_tokens:
            reason = "length"
        shown = text if reason else text[:len(text) - held_back(text, req.stop)]
        self.send(req, Event([token], shown[len(req.text):], *self.scores(req, logits[None], [token]), reason))
        req.text = shown
        return reason is not None

    def echo(self, req: Request, logits: torch.Tensor) -> None:
        """The prompt's tokens with their log-probabilities, from the prompt's logits (n, V); the first has none."""
        lp, top = self.scores(req, logits[:-1], req.prompt[1:])
        first = [None] if req.logprobs is not None else []
        self.send(req, Event(list(req.prompt), self.tok.decode(req.prompt), first + lp, first + top, echo=True))

    def scores(self, req: Request, logits: torch.Tensor, tokens: list[int]) -> tuple[list, list]:
        """With logprobs: each token's log-probability after logits (k, V) and the top `req.logprobs` alternatives,
        the token itself among them (as vLLM gives them)."""
        if req.logprobs is None:
            return [], []
        lp = logits.float().log_softmax(-1)                                        # (k, V)
        chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
        top = lp.topk(req.logprobs, dim=-1)
        return chosen, [dict(zip(i, v)) | {t: c} for i, v, t, c in
                        zip(top.indices.tolist(), top.values.tolist(), tokens, chosen)]

    def text(self, tokens: list[int]) -> str:
        eos = self.tok.eos_token_id
        return self.tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)

    def end(self, req: Request, reason: str) -> None:
        self.send(req, Event([], "", [], [], reason))

    def send(self, req: Request, event: Event) -> None:
        if event.finish_reason:
            req.finish_reason = event.finish_reason
        try:
            (req.on_event or req.events.put)(event)
        except Exception:   # the receiver is gone: end the request, not the engine
            req.cancel()
        if event.finish_reason:
            req.finished.set()
