"""Per-device choice of kernel for the fast backend: the native op where one is built for the
device and pays off, torch (BLAS / SDPA) elsewhere. One home for every such choice."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplus_fast.ops.decode import decode_attention as decode_attention_op
from mplus_fast.ops.decode import decode_attention_reference, decode_gemv

DECODE_ROWS = 8   # x @ w with at most this many rows (a decode step's batch) is a GEMV


def decode_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (K, N) for a decode step: on the CPU its few rows go through the native
    decode_gemv (every weight read once, one sequential stream per thread); otherwise BLAS."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type == "cpu" and 0 < rows <= DECODE_ROWS and w.stride(1) == 1:
        return decode_gemv(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
    return x @ w


def decode_attention(q, k, v, valid, scale: float):
    """One query token over the static cache: the native CPU kernel, SDPA (the op's reference,
    one read of each kv head for its query group) elsewhere."""
    if q.device.type == "cpu":
        return decode_attention_op(q, k, v, valid, scale)
    return decode_attention_reference(q, k, v, valid, scale)


def attention(q, k, v, mask):
    """Grouped-query attention with a boolean mask (True = attend), float32 softmax inside SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
