"""Reference implementations the tests compare minicalm's fast paths against: the same math done the slow, obvious
way, with no KV cache, no shared prefix and no left-padding tricks beyond an attention mask."""
from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_no_cache(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None, *,
                    attention_mask: torch.Tensor | None = None, pad_token_id: int = 0) -> torch.Tensor:
    """greedy_generate's contract, recomputing the whole sequence for every new token. The model takes a padding
    mask only through a cache's key_valid: a padded batch gets a fresh, empty cache for each full pass, a carrier of
    the mask that no step reuses."""
    (B, T), device = input_ids.shape, input_ids.device
    mask = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                            # (B, T)
    more = torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)
    key_valid = None if bool(mask.all()) else torch.cat((mask, more), 1)
    out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        cache = None if key_valid is None else model.new_cache(B, T + i, key_valid=key_valid[:, :T + i])
        token = model(out, positions, cache=cache)[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        done |= token == (eos_token_id if eos_token_id is not None else -1)
        out = torch.cat([out, token[:, None]], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if bool(done.all()):
            break
    return out


@torch.inference_mode()
def label_logprobs(model, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """(N, len(answers)) fp32: the summed log-probability of each answer's tokens after each prompt, one full
    forward pass per (prompt, answer) pair."""
    out = torch.zeros(len(prompts), len(answers))
    for i, p in enumerate(prompts):
        for j, a in enumerate(answers):
            logp = model(torch.tensor([p + a]))[0].float().log_softmax(-1)   # (T, V)
            out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(a))
    return out
