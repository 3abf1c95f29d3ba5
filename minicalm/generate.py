"""Decoding in named steps over a preallocated KV cache, as gpt-fast does: prefill -> decode_one_token ->
decode_n_tokens; and scoring given continuations. The one decoding path: greedy_generate, evaluation (evaluate.py)
and the command below all run these functions.

Prompts of different lengths are left-padded (`left_pad`) so that every row's next token lands in the same cache
slot. A shared prompt head may already sit in the cache's first slots (evaluation computes it once per run): the
prompts are then written after it, `start` slots in, and their positions continue from there.

`python -m minicalm.generate --model M [--adapter DIR] TEXT ...` answers each text (or each line of stdin) with the
task's prompt: the greedy answer, whether it is a valid one, and each label word's probability. With --raw the model
continues the text itself, greedy or sampled, streaming tokens as they come.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator

import torch

from .adapter import base_for, load_adapter
from .config import POST_MODEL
from .data import PromptEncoder, Row
from .model import CalmForCausalLM, KVCache
from .score import parse_answer
from .task import Task, find_task
from .tokenizer import load_tokenizer
from .weights import load_model

LAST = torch.tensor([-1])   # logits_at: only the last position goes through the 52k-wide head


def left_pad(prompts: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L) bool): each prompt right-aligned, padding on its left."""
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, L - len(p):] = True
    return ids.to(device), mask.to(device)


def cache_slots(attention_mask: torch.Tensor, start: int = 0,
                extra: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For left-padded prompts (mask (B, L)) written at cache slots [start, start+L) after `start` shared slots:
    their rotary positions (B, L), each row counting on from `start` at its first real token, and the cache's
    key_valid (B, start + L + extra), False at padding, True at the shared slots and at the `extra` slots decoding
    will fill; None when no row is padded (plain causal attention then)."""
    positions = start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)          # (B, L)
    if bool(attention_mask.all()):
        return positions, None
    B = attention_mask.shape[0]
    ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=attention_mask.device)
    return positions, torch.cat((ones(start), attention_mask.bool(), ones(extra)), dim=1)


def prefill(model: CalmForCausalLM, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
            key_valid: torch.Tensor | None, start: int = 0) -> torch.Tensor:
    """Run the prompts (B, L) into the cache at slots [start, start+L); return the next-token logits (B, V)."""
    end = start + input_ids.shape[1]
    return model(input_ids, positions=positions, key_valid=None if key_valid is None else key_valid[:, :end],
                 cache=cache, start=start, logits_at=LAST.to(input_ids.device))[:, -1]


def decode_one_token(model: CalmForCausalLM, token: torch.Tensor, cache: KVCache, position: torch.Tensor,
                     slot: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """One new token per row (B, 1) at cache slot `slot` and rotary position `position` (B, 1); logits (B, V)."""
    kv = None if key_valid is None else key_valid[:, :slot + 1]
    return model(token, positions=position, key_valid=kv, cache=cache, start=slot)[:, -1]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sampler(temperature: float, top_k: int | None = None, generator: torch.Generator | None = None) -> Callable:
    """A `pick` for decode_tokens that samples from softmax(logits / temperature), among the top_k if given."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[..., 0]
    return pick


def decode_tokens(model: CalmForCausalLM, logits: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                  key_valid: torch.Tensor | None, slot: int, max_new_tokens: int, pick: Callable = greedy,
                  stop_ids: set[int] | None = None, pad_token_id: int = 0,
                  leading_ids: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,), up to max_new_tokens, continuing from a prefill's logits (B, V).

    positions (B,) holds each row's last rotary position, slot the first free cache slot. A row that emits a stop id
    is padded from then on; decoding ends when every row has stopped. A stop id that is also a leading id (a blank
    line) stops a row only once it has emitted some other token.
    """
    B, device = logits.shape[0], logits.device
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    leading = torch.tensor(sorted(leading_ids or []), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    started = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = torch.where(done, torch.full((B,), pad_token_id, device=device), pick(logits))   # (B,)
        is_leading = torch.isin(token, leading)
        done |= torch.isin(token, stop) & (started | ~is_leading)
        started |= ~is_leading
        yield token
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        positions = positions + 1
        logits = decode_one_token(model, token[:, None], cache, positions[:, None], slot + i, key_valid)


def decode_n_tokens(model: CalmForCausalLM, logits: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                    key_valid: torch.Tensor | None, slot: int, max_new_tokens: int, **kw) -> torch.Tensor:
    """decode_tokens' tokens as one tensor (B, n), n <= max_new_tokens (n = 0 when max_new_tokens is 0)."""
    tokens = list(decode_tokens(model, logits, cache, positions, key_valid, slot, max_new_tokens, **kw))
    return torch.stack(tokens, dim=1) if tokens else torch.zeros(len(logits), 0, dtype=torch.long, device=logits.device)


def score_continuations(model: CalmForCausalLM, logits: torch.Tensor, continuations: list[list[int]],
                        cache: KVCache, positions: torch.Tensor, key_valid: torch.Tensor | None,
                        slot: int) -> torch.Tensor:
    """Summed log-probability (fp32) of each continuation's tokens after the prompts: (B, len(continuations)).

    Continues from a prefill's logits (B, V) and cache (the prompts' last positions (B,), the first free slot), as
    the JP LM evaluation harness scores choices. Each continuation is written at the same free slots; a later write
    (another continuation, or decoding) overwrites them.
    """
    B, device = logits.shape[0], logits.device
    first = logits.float().log_softmax(-1)                                             # (B, V)
    out = []
    for c in continuations:
        score = first[:, c[0]]
        if len(c) > 1:   # feed c[:-1] after the prompt, score c[1:]
            feed = torch.tensor(c[:-1], device=device).expand(B, -1)                  # (B, k-1)
            pos = positions[:, None] + 1 + torch.arange(len(c) - 1, device=device)    # (B, k-1)
            kv = None if key_valid is None else key_valid[:, :slot + len(c) - 1]
            lg = model(feed, positions=pos, key_valid=kv, cache=cache, start=slot)   # (B, k-1, V)
            target = torch.tensor(c[1:], device=device).expand(B, -1)[..., None]
            score = score + lg.float().log_softmax(-1).gather(-1, target)[..., 0].sum(-1)
        out.append(score)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def greedy_generate(model: CalmForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, *, attention_mask: torch.Tensor | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt plus up to max_new_tokens greedy tokens (B, T + n), like transformers' generate(do_sample=False).

    Prompts of different lengths come left-padded with attention_mask (B, T) 0 at padding; each row's rotary
    positions then start at its first real token. A row that has emitted eos_token_id is filled with
    pad_token_id (default: eos) until every row is done or max_new_tokens is reached.
    """
    B, T = input_ids.shape
    pad = (eos_token_id or 0) if pad_token_id is None else pad_token_id
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions, key_valid = cache_slots(mask, extra=max_new_tokens)
    cache = model.new_cache(B, T + max_new_tokens)
    logits = prefill(model, input_ids, cache, positions, key_valid)
    new = decode_n_tokens(model, logits, cache, positions[:, -1], key_valid, T, max_new_tokens,
                          stop_ids=None if eos_token_id is None else {eos_token_id}, pad_token_id=pad)
    return torch.cat([input_ids, new], dim=1)


@torch.inference_mode()
def answer(model: CalmForCausalLM, prompts: list[list[int]], pad_id: int, *, head: KVCache | None = None,
           start: int = 0, max_new_tokens: int = 8, stop_ids: set[int] | None = None,
           leading_ids: set[int] | None = None, choices: list[list[int]] | None = None):
    """One batch of prompts, continuing after a shared head whose `start` slots `head` holds (or from slot 0):
    (greedy continuations (B, n) or None when max_new_tokens is 0, summed log-probabilities of each of the
    choices (B, N) or None without choices). Evaluation calls this per batch, the command below once."""
    device = model.gpt_neox.embed_in.weight.device
    extra = max([max_new_tokens, *map(len, choices or [])])
    ids, mask = left_pad(prompts, pad_id, device)
    end = start + ids.shape[1]
    positions, key_valid = cache_slots(mask, start, extra)
    cache = model.new_cache(len(prompts), end + extra, prefix=head)
    logits = prefill(model, ids, cache, positions, key_valid, start)
    scores = score_continuations(model, logits, choices, cache, positions[:, -1], key_valid, end) if choices else None
    tokens = None if not max_new_tokens else decode_n_tokens(
        model, logits, cache, positions[:, -1], key_valid, end, max_new_tokens, stop_ids=stop_ids,
        pad_token_id=pad_id, leading_ids=leading_ids)
    return tokens, scores


# ----------------------------------------------------------------------------- python -m minicalm.generate

def answer_texts(model, tok, task: Task, texts: list[str], max_len: int, max_new_tokens: int) -> Iterator[str]:
    """One line per text: the task's greedy answer (or `invalid`), what the model wrote, each label word's
    probability after the prompt, the text. A task with several fields takes them tab-separated, in its order."""
    enc, labels, (stops, blank) = PromptEncoder(tok, max_len, task), list(task.labels), tok.line_end_ids
    for text in texts:
        values = text.split("\t") if len(task.fields) > 1 else [text]
        if len(values) != len(task.fields):
            raise ValueError(f"task {task.name} needs {len(task.fields)} tab-separated fields "
                             f"({', '.join(task.fields)}), got {len(values)} in {text!r}")
        prompt, _ = enc.encode_prompt(Row(dict(zip(task.fields, values)), labels[0], "0"))
        new, scores = answer(model, [prompt], tok.pad_token_id, max_new_tokens=max_new_tokens, stop_ids=stops,
                             leading_ids=blank, choices=[enc.answer_ids[label] for label in labels])
        toks = new[0].tolist()
        written = tok.decode(toks[:toks.index(tok.eos_token_id)] if tok.eos_token_id in toks else toks)
        probs = " ".join(f"p({label})={p:.3f}" for label, p in zip(labels, scores[0].exp().tolist()))
        yield f"{parse_answer(written, task.labels) or 'invalid'}\t{written!r}\t{probs}\t{text}"


@torch.inference_mode()
def continue_text(model, tok, text: str, max_new_tokens: int, pick: Callable) -> Iterator[str]:
    """The model's own continuation of text (until EOS), as pieces of text to print as they come."""
    ids = tok.encode(text) or [tok.eos_token_id]   # an empty text starts after EOS, as a new document
    device = model.gpt_neox.embed_in.weight.device
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    positions = torch.arange(len(ids), device=device)[None]
    logits = prefill(model, torch.tensor([ids], device=device), cache, positions, None)
    new, shown = [], ""
    for token in decode_tokens(model, logits, cache, positions[:, -1], None, len(ids), max_new_tokens, pick,
                               stop_ids={tok.eos_token_id}, pad_token_id=tok.pad_token_id):
        if int(token) == tok.eos_token_id:
            break
        new.append(int(token))
        text = tok.decode(new).rstrip("\ufffd")   # hold back a character whose bytes are not all there yet
        yield text[len(shown):]
        shown = text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicalm.generate", description=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("text", nargs="*", help="texts (default: one per line of stdin); a task with several fields "
                   "(jnli) takes them tab-separated")
    p.add_argument("--model", default=None, help="hub id or folder (also a merged checkpoint); default: the "
                   f"--adapter's base, else {POST_MODEL}")
    p.add_argument("--revision", default=None, help="hub revision; default: the --adapter's, for its base")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format, e.g. RUN/adapter)")
    p.add_argument("--task", default=None, help="built-in task or task file; default: the task.json beside "
                   "--adapter (or in --model's folder), else marc-ja")
    p.add_argument("--raw", action="store_true", help="let the model continue the text itself, no prompt")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 for answers, 100 with --raw")
    p.add_argument("--temperature", type=float, default=0.0, help="--raw: 0 is greedy, above 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="--raw: sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=0, help="--raw: the sampling seed")
    p.add_argument("--max-len", type=int, default=256, help="prompt tokens; a longer text is truncated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    a = p.parse_args(argv)
    texts = a.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        model_id, revision = base_for(a.adapter, a.model, a.revision)
        tok = load_tokenizer(model_id, revision=revision)
        task = None if a.raw else find_task(a.task, a.adapter, model_id)
        model = load_model(model_id, dtype=a.dtype, device=a.device, revision=revision)
        if a.adapter:
            load_adapter(model, a.adapter, base=model_id)
        if not a.raw:
            for line in answer_texts(model, tok, task, texts, a.max_len, a.max_new_tokens or 8):
                print(line, flush=True)
            return
        g = torch.Generator(a.device).manual_seed(a.seed)
        pick = greedy if a.temperature <= 0 else sampler(a.temperature, a.top_k, g)
        for text in texts:
            print(text, end="", flush=True)
            for piece in continue_text(model, tok, text, a.max_new_tokens or 100, pick):
                print(piece, end="", flush=True)
            print()
    except (ValueError, FileNotFoundError, ImportError) as e:
        p.exit(1, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
