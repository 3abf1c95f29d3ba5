"""GPT-NeoX as OpenCALM uses it, in plain PyTorch: config -> RoPE -> KV cache -> attention -> MLP -> block -> model.

Module names mirror the checkpoints (`gpt_neox.layers.N.attention.query_key_value`, ..., `embed_out`): a checkpoint's
tensors load by their own names once the legacy buffers are dropped; io/weights.py checks every name and shape.
Notation in shape comments: B batch, T new tokens, S keys (cache length), C hidden, nh heads, hs head size.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint as recompute   # activation recompute (grad_checkpoint)

from .config import BLOCK_LINEARS, GELUS, CalmConfig

# A block's linear layers by module name: what LoRA may adapt and what NF4 stores in 4 bits (groups: layer, target).
BLOCK_LINEAR = re.compile(rf"gpt_neox\.layers\.(\d+)\.(?:attention|mlp)\.({'|'.join(BLOCK_LINEARS)})")


# ----------------------------------------------------------------------------- RoPE

def rope_cos_sin(cfg: CalmConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, rd) for integer positions (B, T) (B may be 1: the same for every row), in fp32.

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
    """One layer's keys and values, k and v of shape (B, nh, S, hs), preallocated and written in place."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put k, v (B, nh, T, hs) at slots [start, start+T); return the keys and values of slots [0, start+T)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k   # a (1, ...) prefix fills every row
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of earlier slots for every layer (`layers[i]`, each (B, nh, S, hs)), for decoding.

    A cache is what the model's forward needs of one: `layers[i].update(start, k, v)` stores a call's keys and values
    at slots [start, start+T) and returns those of slots [0, start+T), and `key_valid` (B, S) is False at padding
    slots (None: no padding). Each block gets its own LayerKV, so torch.compile sees every block alike. (Training's
    shared prefix brings a cache of its own with the same two parts: loss.py.)
    """

    def __init__(self, cfg: CalmConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device,
                 key_valid: torch.Tensor | None = None):
        shape = (batch_size, cfg.num_attention_heads, max_len, cfg.head_size)
        self.layers = [LayerKV(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
        self.key_valid = key_valid

    def copy_prefix(self, prefix: "KVCache", length: int) -> None:
        """Slots [0, length) of a one-row cache into every row (a prompt prefix the rows share, computed once)."""
        for mine, theirs in zip(self.layers, prefix.layers):
            mine.update(0, theirs.k[:, :, :length], theirs.v[:, :, :length])


def attention_mask(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S) for queries at cache slots [start, start+T) over keys [0, S = start+T).

    A query sees earlier valid keys and always itself (so a padding row's softmax is never all -inf).
    key_valid (B, S) is False at padding slots.
    """
    S = key_valid.shape[1]
    q_slot = torch.arange(start, start + T, device=key_valid.device)[:, None]   # (T, 1)
    k_slot = torch.arange(S, device=key_valid.device)[None, :]                  # (1, S)
    causal = k_slot <= q_slot                                                    # (T, S)
    return ((causal[None] & key_valid[:, None, :]) | (k_slot == q_slot)[None])[:, None]


def lower_right_causal(T: int, S: int, device: torch.device):
    """Queries at the last T of S slots, each seeing every slot up to its own (rows continuing a shared prefix).

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
    """GPT-NeoX causal LM: `model(idx)` -> logits (B, T, V), as gpt-fast's and litgpt's: tokens, their positions and
    an optional cache.

      positions  (B, T) rotary positions, or (1, T) for every row; default start, start+1, ... (left-padded rows
                 start later: generate.py)
      cache, start  a cache holding slots [0, start) (KVCache); this call's tokens go to slots [start, start+T) and each
                 attends to every earlier valid slot and to itself (causal, aligned to the last slot)
      logits_at  where the 52k-wide LM head runs: a bool mask (B, T) -> (N, V), or indices along T -> (B, K, V)

    The public pieces, for what builds on the model (training's shared prefix, loss.py): `hidden` (the residual
    stream after the last block) and `logits` (the final LayerNorm and the LM head).
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

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None, *, start: int = 0, cache=None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden(idx, positions, start=start, cache=cache)
        if logits_at is not None:
            x = x[logits_at] if logits_at.dtype == torch.bool else x[:, logits_at]
        return self.logits(x)

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, *, start: int = 0,
               cache=None) -> torch.Tensor:
        """The residual stream after the last block, (B, T, C), before the final LayerNorm."""
        B, T = idx.shape
        if positions is None:   # the same for every row: one (1, T) row, broadcast
            positions = torch.arange(start, start + T, device=idx.device)[None]
        cos, sin = rope_cos_sin(self.config, positions)
        mask, causal = None, False   # decided here, outside any compiled block: plain Python bools
        if cache is not None and cache.key_valid is not None:   # padding among the keys
            mask = attention_mask(cache.key_valid[:, :start + T], start, T)
        elif start > 0 and T > 1:   # after `start` cached slots: causal, aligned to the last slot
            mask = lower_right_causal(T, start + T, idx.device)
        else:                       # from slot 0: plain causal (one new token sees every cached slot)
            causal = T > 1
        x = self.gpt_neox.embed_in(idx)                             # (B, T, C)
        for i, block in enumerate(self.gpt_neox.layers):
            kv = None if cache is None else cache.layers[i]
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = recompute(block, x, cos, sin, mask, causal, kv, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, causal, kv, start)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm and the LM head (embed_out): residual stream (..., C) -> logits (..., V)."""
        return self.embed_out(self.gpt_neox.final_layer_norm(x))

    def new_cache(self, batch_size: int, max_len: int, key_valid: torch.Tensor | None = None) -> KVCache:
        """A KVCache of max_len slots in this model's dtype and on its device."""
        w = self.gpt_neox.embed_in.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device, key_valid=key_valid)


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block in eval mode (no dropout); the model's own mode comes back after, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
