"""QLoRA's 4-bit NormalFloat (NF4) base weights in plain PyTorch (Dettmers et al. 2023, arXiv 2305.14314, section 3).

A frozen weight is stored as the index (0..15) of the nearest of 16 values, per block of 64 weights scaled by the
block's largest |w| (absmax), two indices per byte:

    w ~ NF4[code] * absmax[block]                    NF4: 16 quantiles of N(0, 1), scaled into [-1, 1]

Double quantization stores the absmax scales themselves in 8 bits: minus their mean, in blocks of 256, each block
scaled so that its largest |scale| maps to 128 (as torchao's NF4Tensor does). Per weight that is 4 bits + 8/64 +
32/(64 * 256) = 4.127 bits, instead of 16: OpenCALM-7B's block weights (6.44B of them) go from 12.0 GiB in bf16
to 3.1 GiB.

`NF4Linear` is the frozen layer, a base layer like nn.Linear that LoRA wraps the same way (lora.py): forward
dequantizes to the activations' dtype and multiplies; backward needs only the input's gradient, so it saves nothing
of the weight (not the dequantized copy: the codes, which stay anyway) and dequantizes again (`NF4Matmul`);
`dequantize()` gives the dense weight, for merging. LoRA's path stays in full precision beside it: QLoRA.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import BLOCK_LINEAR

# The 16 NF4 values as the QLoRA paper lists them (appendix E): the quantiles of N(0, 1) at 8 positive and 7 negative
# evenly spaced probabilities and an exact zero, divided by the largest (tests/test_nf4.py rebuilds them).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
       0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
BLOCK, SCALE_BLOCK = 64, 256
CHUNK = 2**23   # bytes of codes dequantized at a time (16M weights: 64 MB of fp32 temporaries; 7B: 3-4 per layer)
QUANTIZE_CHUNK = 2**17   # weights quantized at a time (512 KB of fp32 temporaries per step)


def quantize_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (numel / 2,) uint8, absmax (numel / 64,) fp32): each weight's nearest NF4 value after dividing its block
    by the block's absmax, two per byte, the first in the high nibble. An exact tie goes to the lower value.
    QUANTIZE_CHUNK weights at a time, into outputs allocated first: a 50M-weight layer of OpenCALM-7B needs 2 MB
    of fp32 temporaries beside what is kept, not a gigabyte."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights per tensor, got shape {tuple(w.shape)}")
    blocks = w.reshape(-1, BLOCK)                                            # (n_blocks, 64)
    codes = torch.empty(w.numel() // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(len(blocks), device=w.device)
    nf4 = torch.tensor(NF4, device=w.device)
    mids = (nf4[:-1] + nf4[1:]) / 2
    per = QUANTIZE_CHUNK // BLOCK                                            # blocks per chunk
    for i in range(0, len(blocks), per):
        b = blocks[i:i + per].float()
        torch.amax(b.abs(), dim=1, out=absmax[i:i + per])
        scaled = (b / absmax[i:i + per, None].clamp_min(1e-38)).clamp_(-1, 1).flatten()
        q = torch.bucketize(scaled, mids, out_int32=True)                   # the nearest value's index
        torch.bitwise_or(q[0::2] << 4, q[1::2], out=codes[i * BLOCK // 2:(i + per) * BLOCK // 2])
    return codes, absmax


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 codes (n_blocks,), factor per 256 scales, mean) with
    absmax ~ code / factor + mean, factor = 128 / max |absmax - mean| over the block of 256."""
    mean = absmax.mean()
    centred = absmax - mean
    pad = (-len(centred)) % SCALE_BLOCK                                      # the last block may be short
    groups = F.pad(centred, (0, pad)).reshape(-1, SCALE_BLOCK)               # (n_scale_blocks, 256)
    factor = 128 / groups.abs().amax(dim=1).clamp_min(1e-38)                 # (n_scale_blocks,)
    codes = (groups * factor[:, None]).round().clamp(-128, 127).to(torch.int8).flatten()[:len(centred)]
    return codes, factor, mean


class NF4Weight(nn.Module):
    """A frozen (out, in) weight as NF4 codes with double-quantized scales; dequantize() gives it back in a dtype."""

    def __init__(self, weight: torch.Tensor, values: bool = True):
        """values=False makes the buffers without computing them: what the planner counts, on fake tensors."""
        super().__init__()
        if values:
            codes, absmax = quantize_codes(weight)
            scales, factor, mean = quantize_scales(absmax)
        else:
            n, kw = weight.numel() // BLOCK, dict(device=weight.device)
            codes, scales = torch.empty(n * BLOCK // 2, dtype=torch.uint8, **kw), torch.empty(n, dtype=torch.int8, **kw)
            factor, mean = torch.empty(-(-n // SCALE_BLOCK), **kw), torch.empty((), **kw)
        self.register_buffer("codes", codes)          # (out * in / 2,) uint8: two 4-bit indices per byte
        self.register_buffer("scales", scales)        # (out * in / 64,) int8: each block's absmax, double-quantized
        self.register_buffer("factor", factor)        # (blocks / 256,) fp32
        self.register_buffer("mean", mean)            # () fp32
        self.shape, self.dtype = tuple(weight.shape), weight.dtype

    def absmax(self) -> torch.Tensor:
        """Each block's scale, (n_blocks,) fp32."""
        groups = self.factor.repeat_interleave(SCALE_BLOCK)[:len(self.scales)]
        return self.scales.float() / groups + self.mean

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight NF4[code] * absmax, computed in fp32 and rounded once to `dtype` (default: the dtype it
        was quantized from), CHUNK bytes of codes at a time: the fp32 temporaries stay small beside the result."""
        out = torch.empty(2 * len(self.codes), dtype=dtype or self.dtype, device=self.device)
        table, absmax = torch.tensor(NF4, device=self.device), self.absmax()
        pairs = torch.stack((table.repeat_interleave(16), table.repeat(16)), dim=1)   # (256, 2): a byte's two values
        for i in range(0, len(self.codes), CHUNK):
            c = self.codes[i:i + CHUNK]
            values = pairs.index_select(0, c.int()).view(-1, BLOCK)   # each byte's two values, block by block
            torch.mul(values, absmax[2 * i // BLOCK:2 * (i + len(c)) // BLOCK, None],
                      out=out[2 * i:2 * (i + len(c))].view(-1, BLOCK))
        return out.view(self.shape)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        """The weights it stands for (what a parameter count counts: lora.trainable_parameters)."""
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized on the fly, forward and backward: only the codes are kept between the two."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight                            # the module: its codes, no (out, in) tensor
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize(grad.dtype), None, None   # W and b are frozen: no gradient for them


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 (`weight`, an NF4Weight) and whose bias stays in the compute dtype: a
    base layer like nn.Linear, which LoRA wraps the same way; dequantize() gives the dense weight, for merging."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def quantize(cls, linear: nn.Linear, values: bool = True) -> NF4Linear:
        return cls(NF4Weight(linear.weight.detach(), values), None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Matmul.apply(x, self.weight, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)


def quantize_blocks(model: nn.Module, values: bool = True) -> nn.Module:
    """Every linear layer of the transformer blocks as an NF4Linear. The embedding, the LayerNorms and the LM head
    stay in the compute dtype, as in QLoRA: a lookup and a norm are cheap to keep, and the head's logits are what
    the loss and the answers read (3% of OpenCALM-7B's weights). values=False: the planner's NF4 model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and BLOCK_LINEAR.fullmatch(name):
            model.set_submodule(name, NF4Linear.quantize(m, values))
    return model
