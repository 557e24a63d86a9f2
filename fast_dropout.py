"""
Dropout for CPU training that does not dominate the step: masks from 64-bit random integers, and
causal attention written out so that its matmuls stay in the autocast dtype.

    from fast_dropout import Dropout, fast_dropout, causal_attention_with_dropout
    y = fast_dropout(x, 0.2)          # the same in expectation as F.dropout(x, 0.2, training=True)

torch's CPU dropout draws one Bernoulli sample per element; drawing 64-bit integers and cutting each
into four 16-bit uniforms is several times faster (benchmarks/train_throughput.py measures the whole
step). And with dropout on, torch's scaled_dot_product_attention leaves its fused CPU kernel for a
float32 path; written out, its two matmuls stay bfloat16 under autocast, softmax stays float32. CUDA
and MPS always use torch's kernels. model.py calls these; GPT.use_fast_dropout(False) turns them off.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, keeping only the 1-byte mask for backward (not a full-width scaled copy)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


def fast_dropout(x, p):
    """Training-mode dropout for CPU tensors, the same in expectation as F.dropout(x, p, True).

    p is quantised to 1/65536. The bits come from torch's generator, so masks follow
    torch.manual_seed and a resumed run draws the same ones.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be between 0 and 1, got {p}")
    if p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = bits >= round(p * 65536) - 32768
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout that uses fast_dropout on a CPU (unless fast_dropout is off), torch's kernel elsewhere."""

    fast_dropout = True

    def forward(self, x):
        if self.training and self.fast_dropout and x.device.type == "cpu":
            return fast_dropout(x, self.p)
        return super().forward(x)


def causal_attention_with_dropout(q, k, v, p):
    """Causal softmax attention of q, k, v (B, nh, T, hs) with fast_dropout on the attention weights:
    what F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p) computes, with the
    matmuls in the autocast dtype. Materialises the (B, nh, T, T) weights: for training contexts."""
    T, hs = q.size(-2), q.size(-1)
    att = (q * (1.0 / math.sqrt(hs))) @ k.transpose(-2, -1)  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)
    return fast_dropout(att, p) @ v  # (B, nh, T, hs)
