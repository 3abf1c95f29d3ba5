"""What training optimizes: next-token cross-entropy on the scored positions of a micro-batch, with the prompt's
shared prefix computed once. Labels align with input_ids (position t's label is token t) and are IGNORE_INDEX where
nothing is scored (the prompt, the padding); the loss shifts them; the LM head runs only where a label needs it.

The shared prefix: every prompt of a task begins with the same instruction (about half its tokens), so the rows of a
micro-batch share their first P tokens. They run once, as one row, into a cache of their keys and values, and every
row continues from it with its own tokens at positions P, P+1, ... Autograd sums the rows' gradients into the prefix,
so the logits, the loss and every gradient equal those of running each row in full, for about (B-1) P fewer
token-passes. Built from the model's public pieces (`hidden` with a cache, `logits`). One difference: LoRA
dropout's masks in the prefix are drawn once and shared by the rows. train.py and the planner use it; evaluation shares
its prompts' prefix by the same rule (shared_prefix_len), and scores reference answers by validation_loss.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .model import eval_mode

IGNORE_INDEX = -100   # a label the loss skips (F.cross_entropy's default ignore_index): the prompt, the padding


def targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position is scored against: the label one position on, (..., T) -> (..., T-1). The one place the
    labels shift: position t's label is token t, predicted from the tokens before it."""
    return labels[..., 1:]


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many tokens every row of ids begins with: the first column where they differ, else the shortest row."""
    return next((t for t, col in enumerate(zip(*rows)) if any(c != col[0] for c in col)), min(map(len, rows)))


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """The one rule for the shared prefix, in training's micro-batches, evaluation's prompts and the planner: how many
    leading tokens every row of ids has in common, leaving each row at least one token of its own (the prefix is
    continued from there); 0 for a single row, where there is nothing to share."""
    return 0 if len(rows) < 2 else min(common_prefix(rows), min(map(len, rows)) - 1)


class PrefixKV:
    """One layer's keys and values for the shared prefix. A call at slot 0 is the prefix itself (one row): its keys and
    values are kept. A later call (the rows, at slot P) attends to them and to its own: cat(prefix's, its own), as
    plain tensors (no in-place writes, so autograd and activation checkpointing's recompute see ordinary tensors)."""

    def __init__(self):
        self.k = self.v = None

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if start == 0:                                             # the prefix: (1, nh, P, hs)
            self.k, self.v = k, v
            return k, v
        B = k.shape[0]                                             # the rows: (B, nh, P + T', hs)
        return (torch.cat((self.k.expand(B, -1, -1, -1), k), dim=2),
                torch.cat((self.v.expand(B, -1, -1, -1), v), dim=2))


class PrefixCache:
    """What the model asks of a cache (model.KVCache): one PrefixKV per layer, and no padding among the keys."""

    def __init__(self, n_layers: int):
        self.layers, self.key_valid = [PrefixKV() for _ in range(n_layers)], None


def shared_prefix_hidden(model, input_ids: torch.Tensor, P: int) -> torch.Tensor:
    """The residual stream (B, T, C) of rows whose first P tokens are the same, those P computed once."""
    B, T = input_ids.shape
    if not 0 < P < T:
        raise ValueError(f"a shared prefix of {P} tokens needs 0 < P < T = {T} (shared_prefix_len)")
    cache = PrefixCache(model.config.num_hidden_layers)
    prefix = model.hidden(input_ids[:1, :P], cache=cache)                  # (1, P, C), once
    rows = model.hidden(input_ids[:, P:], cache=cache, start=P)            # (B, T-P, C)
    return torch.cat((prefix.expand(B, -1, -1), rows), dim=1)             # (B, T, C)


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of (B, T) input_ids. prefix = P > 0: the rows'
    common first P tokens (shared_prefix_len) are computed once; the same loss and gradients."""
    scored = targets(labels) != IGNORE_INDEX                  # (B, T-1) positions whose next token is scored
    where = F.pad(scored, (0, 1))                             # (B, T): the last position predicts nothing
    h = shared_prefix_hidden(model, input_ids, prefix) if prefix else model.hidden(input_ids)
    logits = model.logits(h[where])                           # (N, V)
    return F.cross_entropy(logits.float(), targets(labels)[scored], reduction="sum")


@torch.no_grad()
def validation_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], share_prefix: bool = True) -> float:
    """answer_loss per scored token over batches of (input_ids, labels), in eval mode (no dropout): training's
    validation loss, and evaluation's loss of the reference answers."""
    total, scored = 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            total += answer_loss(model, x, y, prefix=shared_prefix_len(x.tolist()) if share_prefix else 0).item()
            scored += int((targets(y) != IGNORE_INDEX).sum())
    return total / max(scored, 1)
