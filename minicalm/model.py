"""GPT-NeoX as OpenCALM uses it, in plain PyTorch: config -> RoPE -> KV cache -> attention -> MLP -> block -> model.

Module names mirror the checkpoints (`gpt_neox.layers.N.attention.query_key_value`, ..., `embed_out`), so a
checkpoint loads with `load_state_dict(strict=True)` once the legacy buffers are dropped (see weights.py).
Notation in shape comments: B batch, T new tokens, S keys (cache length), C hidden, nh heads, hs head size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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

class KVCache:
    """Preallocated keys and values for every layer: (B, nh, S_max, hs) each. The caller says where to write."""

    def __init__(self, cfg: CalmConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device):
        shape = (batch_size, cfg.num_attention_heads, max_len, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hs) at [start, start+T) and return all keys and values up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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


# ----------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, cfg: CalmConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.query_key_value = nn.Linear(C, 3 * C, bias=cfg.attention_bias)
        self.dense = nn.Linear(C, C, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, T, C = x.shape
        nh, hs = self.cfg.num_attention_heads, self.cfg.head_size
        # The fused projection is interleaved per head: [q0 k0 v0 | q1 k1 v1 | ...], not [q | k | v].
        qkv = self.query_key_value(x).view(B, T, nh, 3 * hs).transpose(1, 2)   # (B, nh, T, 3*hs)
        q, k, v = qkv.split(hs, dim=-1)                                         # (B, nh, T, hs) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)                             # (B, nh, S, hs)
        # Without a mask, plain causal attention is right only when the queries start at slot 0.
        causal = mask is None and start == 0 and T > 1
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

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, start=0):
        a = self.attention(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
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
      cache, start  a KVCache to write this call's keys and values into, at slots [start, start+T)
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
                start: int = 0, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(self.config, positions)
        mask = None
        if key_valid is not None:
            mask = attention_mask(key_valid, start, T)
        elif start > 0 and T > 1:   # a chunk after a cached prefix: causal with an offset
            mask = attention_mask(torch.ones(B, start + T, dtype=torch.bool, device=input_ids.device), start, T)
        x = self.gpt_neox.embed_in(input_ids)                       # (B, T, C)
        for i, block in enumerate(self.gpt_neox.layers):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, i, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, start)
        if logits_at is not None:
            x = x[logits_at] if logits_at.dtype == torch.bool else x[:, logits_at]
        return self.embed_out(self.gpt_neox.final_layer_norm(x))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.gpt_neox.embed_in.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
