"""Decoding in named steps over a preallocated KV cache, as gpt-fast does: prefill -> decode_one_token ->
decode_n_tokens, score_continuations for given answers, and greedy_generate; evaluation and the commands run these.

What decoding carries from step to step is one small object, `Decoding`: the cache (whose key_valid marks padding),
each row's last rotary position and the first free slot. Prompts of different lengths are left-padded (`left_pad`)
so that every row's next token lands in the same slot; a prompt prefix that every row shares may sit in a one-row
cache (evaluation computes it once per run), which prefill copies in before the prompts.
`python -m minicalm generate` answers texts with a task's prompt, or continues them (tools/commands.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .model import CalmForCausalLM, KVCache

LAST = torch.tensor([-1])   # logits_at: only the last position goes through the 52k-wide LM head


def left_pad(prompts: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, L), attention_mask (B, L) bool): each prompt right-aligned, padding on its left."""
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, L - len(p):] = True
    return ids.to(device), mask.to(device)


@dataclass
class Decoding:
    """The state of a batch being decoded."""
    cache: KVCache            # keys and values of every slot so far; cache.key_valid is False at padding slots
    positions: torch.Tensor   # (B,) each row's last rotary position
    slot: int                 # the first free cache slot: where the next token goes


def prefill(model: CalmForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            extra: int, prefix: KVCache | None = None, start: int = 0,
            every: bool = False) -> tuple[torch.Tensor, Decoding]:
    """Run prompts (B, L), left-padded where attention_mask (B, L) is False, into a new cache with room for `extra`
    more tokens; after `start` slots of `prefix`, a one-row cache every row continues from. Returns the next-token
    logits (B, V) (with `every`, those after every prompt position, (B, L, V): what scoring the prompt needs) and the
    decoding state."""
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = start + (mask.long().cumsum(-1) - 1).clamp(min=0)                   # (B, L)
    key_valid = None   # no padding: plain causal attention
    if not bool(mask.all()):   # padding: the prefix's and the new tokens' slots are valid, and the prompts' own
        ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=mask.device)   # noqa: E731
        key_valid = torch.cat((ones(start), mask, ones(extra)), dim=1)            # (B, start + L + extra)
    cache = model.new_cache(B, start + L + extra, key_valid)
    if prefix is not None:
        cache.copy_prefix(prefix, start)
    logits = model(input_ids, positions, start=start, cache=cache, logits_at=None if every else LAST.to(mask.device))
    return logits if every else logits[:, -1], Decoding(cache, positions[:, -1], start + L)


def decode_one_token(model: CalmForCausalLM, token: torch.Tensor, state: Decoding) -> torch.Tensor:
    """One new token per row (B,) into the next slot, at each row's next position; logits (B, V). Advances state."""
    state.positions = state.positions + 1
    logits = model(token[:, None], state.positions[:, None], start=state.slot, cache=state.cache)[:, -1]
    state.slot += 1
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sampler(temperature: float, top_k: int | None = None, generator: torch.Generator | None = None,
            top_p: float = 1.0) -> Callable:
    """A `pick` for decode_n_tokens that samples from softmax(logits / temperature), among the top_k if given, and
    among the likeliest tokens whose probabilities sum to top_p (nucleus sampling, Holtzman et al. 2019) if below 1."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if top_p < 1:   # drop a token once the likelier ones before it already hold top_p
            p, order = logits.softmax(-1).sort(-1, descending=True)
            after = p.cumsum(-1) - p >= top_p                                     # in order of probability
            logits = logits.masked_fill(torch.empty_like(after).scatter_(-1, order, after), -float("inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[..., 0]
    return pick


def decode_n_tokens(model: CalmForCausalLM, logits: torch.Tensor, state: Decoding, n: int, *, pick: Callable = greedy,
                    stop_ids: set[int] | None = None, leading_ids: set[int] | None = None,
                    pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,), up to n of them, continuing from prefill's logits (B, V).

    A row that emits a stop id is padded from then on, and decoding ends when every row has stopped: no step is spent
    on a batch that is done. A stop id that is also a leading id (a blank line) stops a row only once it has emitted
    some other token."""
    B, device = logits.shape[0], logits.device
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=device)
    leading = torch.tensor(sorted(leading_ids or []), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    started = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(n):
        token = torch.where(done, torch.full((B,), pad_id, device=device), pick(logits))   # (B,)
        is_leading = torch.isin(token, leading)
        done |= torch.isin(token, stop) & (started | ~is_leading)
        started |= ~is_leading
        yield token
        if bool(done.all()) or i == n - 1:
            return
        logits = decode_one_token(model, token, state)


def score_continuations(model: CalmForCausalLM, logits: torch.Tensor, state: Decoding,
                        continuations: list[list[int]]) -> torch.Tensor:
    """Summed log-probability (fp32) of each continuation's tokens after the prompts: (B, len(continuations)).

    Continues from prefill's logits (B, V) and state, as the JP LM evaluation harness scores choices. Each
    continuation is written at the same free slots without advancing the state; a later write (another continuation,
    or decoding) overwrites them."""
    B, device = logits.shape[0], logits.device
    first = logits.float().log_softmax(-1)                                             # (B, V)
    out = []
    for c in continuations:
        score = first[:, c[0]]
        if len(c) > 1:   # feed c[:-1] after the prompt, score c[1:]
            feed = torch.tensor(c[:-1], device=device).expand(B, -1)                  # (B, k-1)
            pos = state.positions[:, None] + 1 + torch.arange(len(c) - 1, device=device)   # (B, k-1)
            lg = model(feed, pos, start=state.slot, cache=state.cache)                # (B, k-1, V)
            target = torch.tensor(c[1:], device=device).expand(B, -1)[..., None]
            score = score + lg.float().log_softmax(-1).gather(-1, target)[..., 0].sum(-1)
        out.append(score)
    return torch.stack(out, dim=1)


@torch.inference_mode()
def greedy_generate(model: CalmForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, *, attention_mask: torch.Tensor | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt plus up to max_new_tokens greedy tokens (B, T + n), like transformers' generate(do_sample=False).

    Prompts of different lengths come left-padded with attention_mask (B, T) 0 at padding. A row that has emitted
    eos_token_id is filled with pad_token_id (default: eos) until every row is done or max_new_tokens is reached."""
    pad = (eos_token_id or 0) if pad_token_id is None else pad_token_id
    logits, state = prefill(model, input_ids, attention_mask, extra=max_new_tokens)
    stop = None if eos_token_id is None else {eos_token_id}
    new = list(decode_n_tokens(model, logits, state, max_new_tokens, stop_ids=stop, pad_id=pad))
    return torch.cat([input_ids, *(t[:, None] for t in new)], dim=1)


if __name__ == "__main__":   # the command lives with the others, which this file does not import
    raise SystemExit("python -m minicalm.generate: the command is `python -m minicalm generate` (--help lists its flags)")
