"""`python -m minicalm serve`: a base model and its adapters behind an OpenAI-compatible API (the completions API as
vLLM serves it), and a page that compares them side by side.

    GET  /v1/models        the base (id: --model as given) and each adapter (id: its NAME, parent: the base), with
                           its task and the fields a question gives
    POST /v1/completions   prompt (a text, texts, token ids or lists of them), max_tokens, temperature (0: greedy),
                           top_p, top_k, stop, seed, n, stream (server-sent events, then [DONE]), logprobs, echo; usage
    POST /v1/answers       a model's task answered as `python -m minicalm generate` answers it: the answer, the text
                           written, each label word's probability (a free-form task: its answer; a question with
                           choices: the index of the one written, each choice's probability)
    GET  /health           GET /: the page (serve_page.html: one file, nothing fetched from elsewhere)

Each prompt becomes a Request for the engine (minicalm/engine.py), which decodes every running request in one
continuous batch on its own thread, each row on its model's adapter (multi_lora.py); events come back to the event loop
through call_soon_threadsafe. Errors have the API's shape, {"error": {"message", "type", "param", "code"}}, the code
being the HTTP status as vLLM sends it: 400 naming the field, 401 without the key (--api-key or MINICALM_API_KEY), 404
for an unknown model (listing the known ones), 413 for a body over --max-body, 503 with Retry-After when the queue is
full. Adapters come from the command line only; a request names a model, never a path. FastAPI and uvicorn are an
optional extra: pip install 'minicalm[serve]'.
"""

import asyncio
import contextlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from ..config import DEVICE, Dtype, POST_MODEL, SettingError, check_choices, check_positions, refuse
from ..engine import Closed, Engine, Event, QueueFull, Request
from ..generate import sampler
from ..io.adapter import load_adapters, read_config
from ..io.tokenizer import load_tokenizer
from ..io.weights import load_model
from ..multi_lora import row_adapters
from ..tasks.data import PromptEncoder, asked_row
from ..tasks.score import choice_answer, free_answer, parse_answer
from ..tasks.task import Task, find_task
from .evaluate import Answers

PAGE = Path(__file__).with_name("serve_page.html")
SHUTDOWN_GRACE = 5.0   # seconds running requests get to finish after SIGTERM / Ctrl-C; then they end ("abort")


@dataclass
class ServeConfig:
    model: str = POST_MODEL                  # the base: hub id or folder; its model id in the API, as given
    adapter: list[str] = field(default_factory=list)   # NAME=DIR: the adapter folder DIR served as model NAME (all
                                             # on --model, in one batch)
    revision: str | None = None              # the base's hub revision
    host: str = "127.0.0.1"                  # where to listen (0.0.0.0: every interface; give --api-key then)
    port: int = 8000                         # the port to listen on (0: any free one, printed at start)
    api_key: str | None = None               # clients send "Authorization: Bearer KEY"; default: $MINICALM_API_KEY,
                                             # else no key
    max_batch: int = 8                       # requests decoded together at most (rows of the preallocated cache)
    max_queue: int = 64                      # requests waiting at most; past it, 503 with Retry-After
    max_len: int = 256                       # /v1/answers: prompt tokens with the answer word (a longer text is cut),
                                             # as generate's --max-len
    max_body: int = 4 * 2**20                # bytes of a request body at most (413 past it)
    allow_other_base: bool = False           # serve adapters recorded for another base than --model (shapes must fit)
    device: str = DEVICE                     # cuda if this torch has it, else cpu
    dtype: Dtype = "auto"                    # the base's (config.resolve_dtype)

    def __post_init__(self):
        check_choices(self)
        if not 0 <= self.port < 65536:
            raise refuse(self, "port", "a TCP port, 0 to 65535 (0: any free one)")
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise refuse(self, name, "at least 1")
        if self.max_len < 1:
            raise refuse(self, "max_len", "at least 1 token")
        if self.max_body < 1024:
            raise refuse(self, "max_body", "at least 1024 bytes")


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES[self.status], "param": self.param,
                          "code": self.status}}


def fits(server, prompt: int, more: int, what: str) -> None:
    """A prompt of `prompt` tokens and `more` after it must fit the model's positions (config.check_positions): 400."""
    try:
        check_positions(server.model.config, prompt + more, ("ServeConfig", "max_tokens"), what,
                        "shorten the prompt or lower max_tokens")
    except SettingError as e:
        raise ApiError(400, f"max_tokens: {e.message}", "max_tokens") from None


# ----------------------------------------------------------------------------- what is served

@dataclass
class Served:
    """One model id of the API: the base (adapter 0) or an adapter, and the task its answers follow."""
    index: int                    # multi_lora's adapter index (0: the base)
    task: Task
    answers: Answers              # the task's prompt, stop rules and label words, as generate uses them
    parent: str | None            # the base's id for an adapter


class Server:
    """The model with every adapter, the engine that runs it, and the model ids a request may name."""

    def __init__(self, cfg: ServeConfig):
        self.cfg, self.key = cfg, cfg.api_key or os.environ.get("MINICALM_API_KEY") or None
        dirs = adapter_dirs(cfg)
        self.tok = load_tokenizer(cfg.model, revision=cfg.revision)
        self.model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision).eval()
        load_adapters(self.model, dirs)
        self.positions, self.vocab = self.model.config.max_position_embeddings, self.model.config.vocab_size
        self.models = {cfg.model: self.served(0, find_task(None, cfg.model), None)}
        for i, (name, folder) in enumerate(dirs.items(), 1):
            self.models[name] = self.served(i, find_task(None, folder, cfg.model), cfg.model)
        self.engine = Engine(self.model, self.tok, cfg.max_batch, cfg.max_queue)
        self.created = int(time.time())

    def served(self, index: int, task: Task, parent: str | None) -> Served:
        enc = PromptEncoder(self.tok, self.cfg.max_len, task)
        return Served(index, task, Answers(self.model, self.tok, enc, task.answer_budget, not task.free_form), parent)

    def model_named(self, body: dict) -> tuple[str, Served]:
        name = need(body, "model", str)
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served here: {', '.join(self.models)}", "model")
        return name, self.models[name]

    def listing(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "minicalm", "root": name,
             "parent": m.parent, "max_model_len": self.positions, "task": m.task.name, "fields": m.task.fields,
             "labels": list(m.task.labels) if m.task.labels else None}   # None: free-form, or each row's choices
            for name, m in self.models.items()]}


def adapter_dirs(cfg: ServeConfig) -> dict[str, str]:
    """--adapter NAME=DIR flags as {name: folder}, each checked before the model loads: the form, a name given twice,
    an adapter the batch cannot hold (DoRA, a residual base) or recorded for another base."""
    dirs: dict[str, str] = {}
    for given in cfg.adapter:
        name, eq, folder = given.partition("=")
        if not eq or not re.fullmatch(r"[\w.:-]+", name) or not folder:
            raise SettingError("ServeConfig", "adapter", f"expected NAME=DIR (NAME of letters, digits, '.', ':', "
                                                         f"'_', '-'), got {given!r}")
        if name in dirs or name == cfg.model:
            raise SettingError("ServeConfig", "adapter", f"the model id {name!r} is given twice")
        adapter = read_config(folder)
        if adapter.config.use_dora or adapter.config.residual:
            raise SettingError("ServeConfig", "adapter", f"{given}: " + (
                "a DoRA adapter cannot share a batch with other adapters (peft's mixed batches refuse it too); merge "
                "it (python -m minicalm merge) and serve the merged model" if adapter.config.use_dora else
                f"init {adapter.config.init} changes the base weights, which every request shares"))
        same = str(adapter.base) == cfg.model or Path(cfg.model).is_dir() and Path(adapter.base).resolve() == \
            Path(cfg.model).resolve()   # a folder given another way
        if adapter.base and not same and not cfg.allow_other_base:
            raise SettingError("ServeConfig", "adapter", f"{given} was trained on {adapter.base!r}, not on --model "
                                                         f"{cfg.model!r} (--allow-other-base serves it anyway)")
        dirs[name] = folder
    return dirs


# ----------------------------------------------------------------------------- a request's fields

def need(body: dict, name: str, kinds, default=..., ok=None, what: str = ""):
    """body[name] checked: of `kinds` (a bool is not a number), and ok(value); absent or null: the default."""
    value = body.get(name)
    if value is None:
        if default is ...:
            raise ApiError(400, f"{name}: required", name)
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or (ok and not ok(value)):
        shown = json.dumps(value, ensure_ascii=False)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        raise ApiError(400, f"{name}: expected {what or ' or '.join(k.__name__ for k in kinds)}, got {shown}", name)
    return value


def token_lists(server: Server, prompt) -> list[list[int]]:
    """`prompt` as the API takes it (a text, texts, token ids, lists of token ids) -> token ids per prompt."""
    ids = lambda p: isinstance(p, list) and p and all(type(t) is int for t in p)   # noqa: E731
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (ids(prompt) or all(isinstance(p, str) or ids(p) for p in prompt)):
        prompts = [prompt] if ids(prompt) else prompt
    else:
        raise ApiError(400, "prompt: expected a text, a list of texts, a list of token ids or a list of such lists "
                            "(none empty)", "prompt")
    out = []
    for p in prompts:
        if isinstance(p, str):   # an empty text starts after EOS: a new document
            out.append(server.tok.encode(p) or [server.tok.eos_token_id])
        elif not all(0 <= t < server.vocab for t in p):
            bad = next(t for t in p if not 0 <= t < server.vocab)
            raise ApiError(400, f"prompt: token ids are 0 to {server.vocab - 1}, got {bad}", "prompt")
        else:
            out.append(p)
    return out


def completion_requests(server: Server, body: dict) -> tuple[str, list[list[int]], list[Request], dict]:
    """The /v1/completions body -> (model id, prompts, one engine Request per choice, options). Every field is
    checked before anything runs."""
    name, served = server.model_named(body)
    prompts = token_lists(server, need(body, "prompt", (str, list)))
    max_tokens = need(body, "max_tokens", int, 16, lambda v: v >= 1, "an integer >= 1")
    temperature = need(body, "temperature", (int, float), 1.0, lambda v: 0 <= v < math.inf, "a number >= 0")
    top_p = need(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = need(body, "top_k", int, -1, lambda v: v >= -1, "an integer >= 1 (-1 or 0: every token)")
    stop = need(body, "stop", (str, list), [], lambda v: isinstance(v, str) and v or isinstance(v, list) and all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them")
    seed = need(body, "seed", int, None)
    n = need(body, "n", int, 1, lambda v: 1 <= v <= 16, "an integer from 1 to 16")
    logprobs = need(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
    options = {"stream": need(body, "stream", bool, False), "echo": need(body, "echo", bool, False),
               "logprobs": logprobs, "usage": need(body, "stream_options", dict, {}).get("include_usage") is True}
    for key, neutral in (("best_of", (None, 1, n)), ("suffix", (None, "")), ("logit_bias", (None, {})),
                         ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0))):
        if body.get(key) not in neutral:
            raise ApiError(400, f"{key}: not supported by this server", key)
    for p in prompts:
        fits(server, len(p), max_tokens, f"a prompt of {len(p)} tokens plus max_tokens {max_tokens}")
    reqs = []
    for p in prompts:
        for j in range(n):
            pick = None
            if temperature > 0:   # a generator per choice: its draws depend on its seed only, not on its neighbours
                g = torch.Generator(server.engine.device).manual_seed(
                    (seed + j) if seed is not None else random.getrandbits(63))
                pick = sampler(temperature, top_k if top_k > 0 else None, g, top_p)
            reqs.append(Request(p, max_tokens, served.index, pick, stop=tuple([stop] if isinstance(stop, str)
                                                                              else stop),
                                logprobs=logprobs, echo=options["echo"]))
    return name, prompts, reqs, options


# ----------------------------------------------------------------------------- responses

class Tokens:
    """How tokens are shown in logprobs: their text, or where a token holds part of a character, its bytes as
    OpenAI writes them ("bytes:\\xe3\\x81"), so that no two tokens share a name."""

    def __init__(self, tok):
        self.tok = tok
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]   # GPT-2's byte-level alphabet (bytes_to_unicode)
        self.bytes = {chr(b): b for b in keep} | {chr(256 + k): b for k, b in enumerate(
            b for b in range(256) if b not in keep)}

    def name(self, i: int) -> str:
        text = self.tok.texts[i]
        if "\ufffd" not in text:
            return text
        piece = self.tok.tk.id_to_token(i)
        return "bytes:" + "".join(f"\\x{self.bytes.get(c, 0):02x}" for c in piece)

    def offsets(self, tokens: list[int]) -> list[int]:
        """Where each token's text begins in the text of `tokens`; a token that completes a character begins where
        that character does."""
        out, text, j = [], "", 0
        for i in range(len(tokens)):
            piece = self.tok.decode(tokens[j:i])
            if not piece.endswith("\ufffd"):   # a character boundary: decode from here on
                text, j, piece = text + piece, i, ""
            out.append(len(text) + len(piece.rstrip("\ufffd")))
        return out


class Choice:
    """One choice's text, tokens and log-probabilities, gathered from its engine events."""

    def __init__(self, index: int):
        self.index, self.text, self.finish_reason, self.generated = index, "", None, 0
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.top: list = []
        self.offsets: list[int] = []   # where each token's text begins: the length of the text sent before it

    def add(self, e: Event, names: "Tokens") -> int:
        """Take an event in; returns where its tokens begin in the choice's lists."""
        start = len(self.tokens)
        self.offsets += names.offsets(e.tokens) if e.echo else [len(self.text)] * len(e.tokens)
        self.tokens += e.tokens
        self.logprobs += e.logprobs
        self.top += e.top
        self.text += e.text
        self.generated += 0 if e.echo else len(e.tokens)
        self.finish_reason = e.finish_reason
        return start

    def logprobs_from(self, names: "Tokens", start: int = 0) -> dict:
        """The API's logprobs object for the choice's tokens from `start` on."""
        return {"tokens": [names.name(t) for t in self.tokens[start:]], "token_logprobs": self.logprobs[start:],
                "top_logprobs": [None if top is None else {names.name(t): v for t, v in top.items()}
                                 for top in self.top[start:]],
                "text_offset": self.offsets[start:]}


class Submitted:
    """Requests handed to the engine (503 if its queue is full), iterated as (request index, event) while the engine
    sends them. Leaving early (the client went away) cancels those still running: their rows free at the next step."""

    def __init__(self, server: Server, reqs: list[Request]):
        loop, self.queue, self.reqs = asyncio.get_running_loop(), asyncio.Queue(), reqs
        for i, req in enumerate(reqs):
            req.on_event = lambda e, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, e))
        try:
            server.engine.submit(*reqs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry in a moment") from None
        except Closed:
            raise ApiError(503, "the server is shutting down") from None

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        left = len(self.reqs)
        try:
            while left:
                i, e = await self.queue.get()
                left -= e.finish_reason is not None
                yield i, e
        finally:
            for req in self.reqs:
                req.cancel()


async def until_disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    p, c = sum(map(len, prompts)), sum(ch.generated for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ----------------------------------------------------------------------------- the app

def make_app(server: Server):
    """The FastAPI app: each route a thin call into the functions below, which take the server."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="minicalm", docs_url=None, redoc_url=None, openapi_url=None)
    names = Tokens(server.tok)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "running": len(e.running), "waiting": len(e.waiting), "key": server.key is not None}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(server, request)
        return server.listing()

    @app.post("/v1/completions")
    async def completions_route(request: HttpRequest):
        return await completions(server, names, request)

    @app.post("/v1/answers")
    async def answers_route(request: HttpRequest):
        return await answers(server, request)

    return app


def authorize(server: Server, request) -> None:
    if server.key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                              f"Bearer {server.key}".encode()):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY")


async def read_body(server: Server, request) -> dict:
    """The request's JSON object, after its key is checked; its size is limited as it is read."""
    authorize(server, request)
    limit, size = server.cfg.max_body, request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the body's {int(size):,} bytes exceed the limit of {limit:,} (--max-body)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit:,} bytes (--max-body)")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def reply(request, work):
    """The JSON that a coroutine running requests returns, unless the client goes first: then its requests are
    cancelled (their rows free at the engine's next step)."""
    from fastapi.responses import JSONResponse
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not task.done():
        task.cancel()
        return JSONResponse({}, 499)   # nginx's "client closed request": no one reads it
    return JSONResponse(task.result())


def sse(chunks):
    """Server-sent events: each chunk as `data: {json}`, then `data: [DONE]`."""
    from fastapi.responses import StreamingResponse

    async def stream():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completions(server: Server, names: Tokens, request):
    """POST /v1/completions: the prompts continued, streamed or whole."""
    name, prompts, reqs, opt = completion_requests(server, await read_body(server, request))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": name}
    choices = [Choice(i) for i in range(len(reqs))]
    submitted = Submitted(server, reqs)

    async def chunks():
        async for i, e in submitted:
            if e.text or e.finish_reason or e.tokens and opt["logprobs"] is not None:
                c = choices[i]
                start = c.add(e, names)
                yield head | {"choices": [{"index": i, "text": e.text, "finish_reason": e.finish_reason,
                                           "logprobs": c.logprobs_from(names, start) if opt["logprobs"] is not None
                                           else None}]}
        if opt["usage"]:
            yield head | {"choices": [], "usage": usage(prompts, choices)}

    async def whole():
        async for i, e in submitted:
            choices[i].add(e, names)
        return head | {"choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                                    "logprobs": c.logprobs_from(names) if opt["logprobs"] is not None else None}
                                   for c in choices], "usage": usage(prompts, choices)}

    return sse(chunks()) if opt["stream"] else await reply(request, whole())


async def answers(server: Server, request):
    """POST /v1/answers: a text answered with the served model's task, as generate answers it."""
    body = await read_body(server, request)
    name, served = server.model_named(body)
    task, ans = served.task, served.answers
    text = need(body, "text", str, None)
    try:   # `text` as generate takes it (the task's fields tab-separated), else the fields by name
        given = task.fields_of(text) if text is not None else {f: need(body, f, str, "") for f in task.fields}
        if not any(given.values()):
            raise ApiError(400, f"text: required (or the fields of model {name}'s task {task.name} by name: "
                                f"{', '.join(task.fields)})", "text")
        row = asked_row(task, given)   # a question's choices among its fields
    except ValueError as e:
        raise ApiError(400, f"text: {e}", "text") from None
    budget = need(body, "max_tokens", int, ans.max_new_tokens, lambda v: v >= 1, "an integer >= 1")
    prompt = ans.enc.encode_prompt(row)[0]
    more = max([budget, *map(len, ans.enc.answer_ids.values())])   # the answer written, or a label word scored
    fits(server, len(prompt), more, f"the prompt's {len(prompt)} tokens plus {more} more")
    stream = need(body, "stream", bool, False)
    probabilities = None if task.free_form else server.engine.call(
        lambda: answer_probabilities(server, served, prompt, row.choices))
    req = Request(prompt, budget, served.index, stop_ids=frozenset(ans.stops),
                  leading_ids=frozenset(ans.leading), stop=tuple(task.stop or ()))
    submitted = Submitted(server, [req])

    async def final() -> dict:
        written = ans.text(req.tokens)   # as generate: the continuation up to EOS
        if task.free_form:
            answer = free_answer(written, task.stop)
        elif task.multiple_choice:   # the choice's index
            answer = choice_answer(written, row.choices)
        else:
            answer = parse_answer(written, task.labels)
        probs = None if probabilities is None else await asyncio.wrap_future(probabilities)
        return {"object": "answer", "model": name, "task": task.name, "answer": answer, "text": written,
                **({"choices": list(row.choices)} if task.multiple_choice else {}),
                "probabilities": probs, "finish_reason": req.finish_reason,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(req.tokens),
                          "total_tokens": len(prompt) + len(req.tokens)}}

    async def chunks():
        async for _, e in submitted:
            if e.text:
                yield {"object": "answer.chunk", "model": name, "text": e.text}
        yield await final()

    async def whole():
        async for _ in submitted:
            pass
        return await final()

    return sse(chunks()) if stream else await reply(request, whole())


def answer_probabilities(server: Server, served: Served, prompt: list[int],
                         choices: tuple[str, ...]) -> dict[str, float] | list[float]:
    """Each label word's probability after the prompt (a multiple-choice question: each choice's, in its order), as
    generate prints them: evaluate.Answers' scoring, on the engine's thread (between two steps), the prompt's row on
    its model's adapter."""
    scorer = Answers(server.model, server.tok, served.answers.enc, 0, likelihood=True)
    with row_adapters(server.model, torch.tensor([served.index], device=server.engine.device)):
        (p,) = scorer([prompt], [choices] if choices else None)
    if choices:
        return [math.exp(x) for x in p["logprobs"]]
    return {label: math.exp(p[f"logprob_{label}"]) for label in served.task.labels}


# ----------------------------------------------------------------------------- the command

def listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads so that a port in use is said at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SettingError("ServeConfig", "port", f"cannot listen on {host}:{port}: {e.strerror} (another server "
                                                  f"there? pick another --port)") from None
    return sock


@contextlib.contextmanager
def running(cfg: ServeConfig):
    """The server in this process, uvicorn and the engine on threads of their own (a notebook's, a test's, a
    benchmark's): yields (base URL, Server); stops both on leaving."""
    import uvicorn
    sock = listen(cfg.host, cfg.port)
    server = Server(cfg)
    server.engine.start()
    uv = uvicorn.Server(uvicorn.Config(make_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://{cfg.host}:{sock.getsockname()[1]}", server
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.engine.close(abort=True)
        server.engine.thread.join(timeout=10)


def serve(cfg: ServeConfig) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ImportError("python -m minicalm serve needs FastAPI and uvicorn: pip install 'minicalm[serve]' (or pip "
                          "install fastapi uvicorn)") from None
    adapter_dirs(cfg)   # a bad --adapter is said before anything loads
    sock = listen(cfg.host, cfg.port)
    server = Server(cfg)
    engine = server.engine.start()
    host, port = sock.getsockname()[:2]

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig, frame):   # SIGTERM, Ctrl-C: no new requests; those running get SHUTDOWN_GRACE s
            super().handle_exit(sig, frame)
            engine.close()
            timer = threading.Timer(SHUTDOWN_GRACE, engine.close, kwargs={"abort": True})
            timer.daemon = True   # it must not keep a stopped server's process alive
            timer.start()

    app = make_app(server)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(SHUTDOWN_GRACE) + 5)
    adapters = ", ".join(list(server.models)[1:]) or "none"
    print(f"minicalm serve: {cfg.model} and {len(server.models) - 1} adapter(s) ({adapters}) on http://{host}:{port} "
          f"(the page at /, the API at /v1)", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):   # uvicorn raises the signal again once it has stopped: exit 0 then
        signal.signal(sig, signal.SIG_IGN)
    Graceful(config).run(sockets=[sock])
    engine.close(abort=True)
    engine.thread.join(timeout=10)
    print("minicalm serve: stopped", flush=True)


SERVE = ("Serve a base model and its adapters (all in one batch) behind an OpenAI-compatible API (/v1/completions, "
         "/v1/models), with /v1/answers for each adapter's task and a page at / that compares them side by side.")
