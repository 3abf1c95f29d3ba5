"""What training optimizes, in one place: next-token cross-entropy on the labelled positions of a micro-batch.

Labels align with input_ids (position t's label is token t itself) and are IGNORE_INDEX where nothing is scored;
the loss shifts them. Used by train() (the step), plan (the same step on fake tensors) and validation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def shared_prefix_len(input_ids: torch.Tensor) -> int:
    """How many leading tokens every row has in common (the prompt's head), leaving each row at least one token of
    its own; 0 for a single row, where there is nothing to share."""
    B, T = input_ids.shape
    if B < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)                 # (T,) column is identical in every row
    return min(int(same.long().cumprod(dim=0).sum()), T - 1)


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, shared: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions; the LM head runs only where labels need it.

    shared = P > 0 computes the rows' common first P tokens once (CalmForCausalLM's `shared`): the same loss and
    gradients, about (B-1) P fewer token-passes through the blocks.
    """
    targets = labels[:, 1:]                                   # (B, T-1) the token after each position
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = targets != IGNORE_INDEX                   # (B, T) positions whose next token is scored
    logits = model(input_ids, shared=shared, logits_at=where)   # (N, V)
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")


def micro_step(model, input_ids: torch.Tensor, labels: torch.Tensor, n_target: int, shared: int = 0) -> torch.Tensor:
    """Forward and backward of one micro-batch, its loss scaled by the global batch's target count.

    Gradients accumulate in .grad across micro-batches; returns the micro-batch's summed loss (detached).
    """
    loss = answer_loss(model, input_ids, labels, shared)
    (loss / n_target).backward()
    return loss.detach()
