"""GPT-NeoX as OpenCALM uses it, in plain PyTorch: config -> RoPE -> KV cache -> attention -> MLP -> block -> model.

Module names mirror the checkpoints (`gpt_neox.layers.N.attention.query_key_value`, ..., `embed_out`): a checkpoint's
tensors load by their own names once the legacy buffers are dropped; weights.py checks every name and shape.
Notation in shape comments: B batch, T new tokens, S keys (cache length), C hidden, nh heads, hs head size.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from .config import GELUS, CalmConfig


# ----------------------------------------------------------------------------- RoPE

def rope_cos_sin(cfg: CalmConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, rd) for integer positions (B, T), computed in fp32.

    inv_freq is rebuilt here in fp32 rather than stored: a bf16 buffer would damage long positions, and the
    model then has no buffers at all, so it can be built on the meta device and filled from a checkpoint.
    """
    rd = cfg.rotary_ndims
    inv_freq = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, rd, 2, device=positions.device).float() / rd))
    freqs = positions.float()[..., None] * inv_freq          # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]          # (B, 1, T, rd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rd dims of x (B, nh, T, hs) with the rotate-half convention; the rest pass through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = torch.cat((-x_rot[..., rd // 2:], x_rot[..., : rd // 2]), dim=-1)
    x_rot = x_rot * cos.to(x.dtype) + half * sin.to(x.dtype)
    return x_rot if x_pass.shape[-1] == 0 else torch.cat((x_rot, x_pass), dim=-1)   # OpenCALM rotates every dim


# ----------------------------------------------------------------------------- KV cache

class LayerKV:
    """One layer's keys and values, k and v of shape (B, nh, S, hs), and how a call adds its own (see KVCache)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, preallocated: bool):
        self.k, self.v, self.preallocated = k, v, preallocated

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put k, v (B, nh, T, hs) at slots [start, start+T); return the keys and values of slots [0, start+T)."""
        B, end = k.shape[0], start + k.shape[2]
        if not self.preallocated:   # growing: concatenate, never write in place
            if self.k.shape[2] < start:
                raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to continue at {start}")
            k = torch.cat((self.k[:, :, :start].expand(B, -1, -1, -1), k), dim=2)   # (B, nh, start+T, hs)
            v = torch.cat((self.v[:, :, :start].expand(B, -1, -1, -1), v), dim=2)
            if B == self.k.shape[0]:   # a 1-row shared head read by B rows stays as it is
                self.k, self.v = k, v
            return k, v
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of earlier slots for every layer: layers[i] (a LayerKV), each (B, nh, S, hs).

    A layer's update(start, k, v) puts a call's keys and values at slots [start, start+T) and returns those of
    slots [0, start+T) for attention. Two kinds:
      preallocated (max_len given; decoding): S = max_len, written in place; `prefix` copies a shared prompt
        head's slots [0, P) into every row first (evaluation computes the head once per run);
      growing (max_len None; training's shared head): starts empty and returns cat(slots [0, start), new), so
        autograd sees plain tensors (no in-place writes, and activation checkpointing may recompute a layer).
        A 1-row growing cache read by B rows is broadcast to them and keeps only its own row's slots.
    Each block gets its own LayerKV (not the cache and a layer number), so torch.compile sees every block alike.
    """

    def __init__(self, cfg: CalmConfig, batch_size: int = 1, max_len: int | None = None, *, dtype: torch.dtype,
                 device, prefix: "KVCache | None" = None):
        shape = (batch_size, cfg.num_attention_heads, max_len or 0, cfg.head_size)
        self.layers = [LayerKV(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device), max_len is not None)
                       for _ in range(cfg.num_hidden_layers)]
        for mine, head in zip(self.layers, prefix.layers) if prefix is not None else ():
            mine.update(0, head.k, head.v)


def attention_mask(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S) for queries at cache slots [start, start+T) over keys [0, S).

    A query sees earlier valid keys and always itself (so a padding row's softmax is never all -inf).
    key_valid (B, S) is False at padding slots.
    """
    S = key_valid.shape[1]
    q_slot = torch.arange(start, start + T, device=key_valid.device)[:, None]   # (T, 1)
    k_slot = torch.arange(S, device=key_valid.device)[None, :]                  # (1, S)
    causal = k_slot <= q_slot                                                    # (T, S)
    return ((causal[None] & key_valid[:, None, :]) | (k_slot == q_slot)[None])[:, None]


def lower_right_causal(T: int, S: int, device: torch.device):
    """Queries at the last T of S slots, each seeing every slot up to its own (rows continuing a shared head).

    On GPU PyTorch's lower-right causal bias, which SDPA's fused kernels take as it is; elsewhere the same pattern
    as one (T, S) boolean mask (CPU attention would build it anyway, and fake tensors cannot hold the bias).
    """
    if device.type == "cuda":
        return causal_lower_right(T, S)
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.query_key_value = nn.Linear(C, 3 * C, bias=cfg.attention_bias)
        self.dense = nn.Linear(C, C, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask=None, causal: bool = False, kv: LayerKV | None = None, start: int = 0):
        B, T, C = x.shape
        nh, hs = self.cfg.num_attention_heads, self.cfg.head_size
        # The fused projection is interleaved per head: [q0 k0 v0 | q1 k1 v1 | ...], not [q | k | v].
        qkv = self.query_key_value(x).view(B, T, nh, 3 * hs).transpose(1, 2)   # (B, nh, T, 3*hs)
        q, k, v = qkv.split(hs, dim=-1)                                         # (B, nh, T, hs) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(start, k, v)                                       # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)   # scale hs**-0.5
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.dense(y)


class MLP(nn.Module):
    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = GELUS[cfg.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, causal=False, kv=None, start=0):
        a = self.attention(self.input_layernorm(x), cos, sin, mask, causal, kv, start)
        if self.parallel:   # Pythia: x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a           # OpenCALM: x + attn(ln1(x)), then + mlp(ln2(.))
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoX(nn.Module):
    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CalmForCausalLM(nn.Module):
    """GPT-NeoX causal LM: `model(input_ids)` -> logits (B, T, V).

    Optional arguments, used by decoding, evaluation and training:
      positions  (B, T) rotary positions; default start, start+1, ...
      key_valid  (B, S) False at padding slots of the cache (or of input_ids when there is no cache)
      cache, start  a KVCache holding slots [0, start) (e.g. a shared prompt head); this call's tokens go to slots
                 [start, start+T) and each attends to every earlier slot and to itself (causal, lower-right aligned)
      shared     P: input_ids[:, :P] is the same in every row (the prompt's head). It runs once, as one row, into a
                 growing KVCache; the rows continue from its keys and values with their own T - P tokens at
                 positions P, P+1, ... The logits, the loss and every gradient equal those of running each row in
                 full (autograd sums the rows' gradients into the head), for about (B-1) P fewer token-passes. The
                 head's dropout masks (LoRA's) are then shared by the rows.
      logits_at  where to compute the 52k-wide head: a bool mask (B, T) -> (N, V), or indices along T -> (B, K, V)
    """

    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.config = cfg
        self.gpt_neox = GPTNeoX(cfg)
        self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.grad_checkpoint = False   # recompute each block in backward instead of storing its activations

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "CalmForCausalLM":
        """Random init for pretraining from scratch (normal(0, std) linears/embeddings, unit LayerNorms)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.data.fill_(1.0), m.bias.data.zero_()
        return self

    def forward(self, input_ids: torch.Tensor, *, positions=None, key_valid=None, cache: KVCache | None = None,
                start: int = 0, shared: int = 0, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if shared:
            if not 0 < shared < T or cache is not None or start or positions is not None or key_valid is not None:
                raise ValueError(f"shared={shared} needs 0 < shared < T={T} and no cache, start, positions, key_valid")
            head = self.new_cache()                                                   # growing, one row
            h = self.hidden(input_ids[:1, :shared], cache=head)                        # (1, P, C), once
            own = self.hidden(input_ids[:, shared:], cache=head, start=shared)         # (B, T-P, C)
            x = torch.cat((h.expand(B, -1, -1), own), dim=1)                           # (B, T, C)
        else:
            x = self.hidden(input_ids, positions=positions, key_valid=key_valid, cache=cache, start=start)
        if logits_at is not None:
            x = x[logits_at] if logits_at.dtype == torch.bool else x[:, logits_at]
        return self.embed_out(self.gpt_neox.final_layer_norm(x))

    def hidden(self, input_ids, positions=None, key_valid=None, cache: KVCache | None = None, start: int = 0):
        """The residual stream after the last block, (B, T, C), before the final LayerNorm (see forward)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(self.config, positions)
        mask, causal = None, False   # decided here, outside any compiled block: plain Python bools
        if key_valid is not None:
            mask = attention_mask(key_valid, start, T)
        elif start > 0 and T > 1:   # after `start` cached slots: causal, aligned to the last slot
            mask = lower_right_causal(T, start + T, input_ids.device)
        else:                       # from slot 0: plain causal (one new token sees every cached slot)
            causal = T > 1
        x = self.gpt_neox.embed_in(input_ids)                       # (B, T, C)
        for i, block in enumerate(self.gpt_neox.layers):
            kv = None if cache is None else cache.layers[i]
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, causal, kv, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, causal, kv, start)
        return x

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, prefix: KVCache | None = None) -> KVCache:
        """A KVCache in this model's dtype and device: preallocated for max_len slots, or growing (max_len None)."""
        w = self.gpt_neox.embed_in.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device, prefix=prefix)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block in eval mode (no dropout); the model's own mode comes back after, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
