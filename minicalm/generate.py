"""Greedy decoding in named steps (prefill, decode_one_token, greedy_generate) over a preallocated KV cache."""
from __future__ import annotations

import torch

from .model import CalmForCausalLM, KVCache

LAST = torch.tensor([-1])   # logits_at: only the last position goes through the 52k-wide head


def prefill(model: CalmForCausalLM, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
            key_valid: torch.Tensor | None) -> torch.Tensor:
    """Run the prompt (B, T) into the cache at slots [0, T); return the next-token logits (B, V)."""
    return model(input_ids, positions=positions, key_valid=key_valid, cache=cache, start=0,
                 logits_at=LAST.to(input_ids.device))[:, -1]


def decode_one_token(model: CalmForCausalLM, token: torch.Tensor, cache: KVCache, position: torch.Tensor,
                     slot: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """One new token per row (B, 1) at cache slot `slot` and rotary position `position` (B, 1); logits (B, V)."""
    return model(token, positions=position, key_valid=key_valid, cache=cache, start=slot)[:, -1]


def greedy_loop(model: CalmForCausalLM, logits: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                key_valid: torch.Tensor | None, slot: int, max_new_tokens: int, stop_ids: set[int] | None,
                pad_token_id: int, leading_ids: set[int] | None = None) -> torch.Tensor:
    """Greedy tokens (B, n <= max_new_tokens) after a prefill whose next-token logits (B, V) are given.

    positions (B,) is each row's last rotary position, slot the first free cache slot; key_valid (B, S) marks
    the cache's padding (None: no padding). A row that emits a stop id is padded from then on; the loop ends
    when every row has stopped. Stop ids that are also in leading_ids (blank lines) stop a row only once it has
    emitted some other token.
    """
    B = logits.shape[0]
    stop = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=logits.device)
    leading = torch.tensor(sorted(leading_ids or []), dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    started = torch.zeros(B, dtype=torch.bool, device=logits.device)
    tokens = []
    for i in range(max_new_tokens):
        token = logits.argmax(dim=-1)                                          # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        is_leading = torch.isin(token, leading)
        done |= torch.isin(token, stop) & (started | ~is_leading)
        started |= ~is_leading
        tokens.append(token)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        positions = positions + 1
        logits = decode_one_token(model, token[:, None], cache, positions[:, None], slot + i,
                                  None if key_valid is None else key_valid[:, :slot + i + 1])
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def greedy_generate(model: CalmForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, *, attention_mask: torch.Tensor | None = None,
                    pad_token_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Prompt plus up to max_new_tokens greedy tokens (B, T + n), like transformers' generate(do_sample=False).

    Prompts of different lengths come left-padded with attention_mask (B, T) 0 at padding; each row's rotary
    positions then start at its first real token. A row that has emitted eos_token_id is filled with
    pad_token_id (default: eos) until every row is done or max_new_tokens is reached.
    use_cache=False recomputes the whole sequence each step (the reference the cache is tested against).
    """
    B, T = input_ids.shape
    device = input_ids.device
    pad = (eos_token_id or 0) if pad_token_id is None else pad_token_id
    stop_ids = None if eos_token_id is None else {eos_token_id}
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)          # (B, T)
    key_valid = None
    if not bool(attention_mask.all()):
        key_valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        key_valid[:, :T] = attention_mask.bool()
    if use_cache:
        cache = model.new_cache(B, T + max_new_tokens)
        logits = prefill(model, input_ids, cache, positions, None if key_valid is None else key_valid[:, :T])
        new = greedy_loop(model, logits, cache, positions[:, -1], key_valid, T, max_new_tokens, stop_ids, pad)
        return torch.cat([input_ids, new], dim=1)
    out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):   # the reference: the whole sequence again for every token
        kv = None if key_valid is None else key_valid[:, :T + i]
        token = model(out, positions=positions, key_valid=kv, logits_at=LAST.to(device))[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        done |= token == (eos_token_id if eos_token_id is not None else -1)
        out = torch.cat([out, token[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if bool(done.all()):
            break
    return out
