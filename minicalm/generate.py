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
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    padded = not bool(attention_mask.all())
    key_valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
    key_valid[:, :T] = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)          # (B, T)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = input_ids
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    if use_cache:
        logits = prefill(model, input_ids, cache, positions, key_valid[:, :T] if padded else None)
    for i in range(max_new_tokens):
        if not use_cache:
            logits = model(out, positions=positions, key_valid=key_valid[:, :T + i] if padded else None)[:, -1]
        token = logits.argmax(dim=-1)                                          # (B,)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
            done |= token == eos_token_id
        out = torch.cat([out, token[:, None]], dim=1)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        position = positions[:, -1:] + 1                                       # (B, 1)
        positions = torch.cat([positions, position], dim=1)
        if use_cache:
            logits = decode_one_token(model, token[:, None], cache, position, T + i,
                                      key_valid[:, :T + i + 1] if padded else None)
    return out
