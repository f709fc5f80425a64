"""Per-device choice of kernel for the fast backend: the native op where one is built for the
device and pays off, torch (BLAS / SDPA) elsewhere. One home for every such choice."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mplus_fast.ops import has_native_kernel
from mplus_fast.ops.attention import memory_attention, merge_attention_states
from mplus_fast.ops.decode import decode_attention as decode_attention_op
from mplus_fast.ops.decode import decode_attention_lse, decode_attention_reference, decode_gemv

DECODE_ROWS = 8   # x @ w with at most this many rows (a decode step's batch) is a GEMV


def decode_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (K, N) for a decode step: on the CPU its few rows go through the native
    decode_gemv (every weight read once, one sequential stream per thread); otherwise BLAS."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type == "cpu" and 0 < rows <= DECODE_ROWS and w.stride(1) == 1:
        return decode_gemv(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
    return x @ w


def decode_attention(q, k, v, valid, scale: float, shared=None):
    """One query token over the static cache: the native CPU kernel, SDPA (the op's reference,
    one read of each kv head for its query group) elsewhere. With `shared` ((k, v) of a prefix
    (1, Hkv, P_s, D) every sequence attends besides its own cache): on the CPU the native kernel
    attends both parts in one pass (each shared row read once for the batch); elsewhere the two
    parts are attended separately and merged by log-sum-exp (`split_decode_attention`)."""
    if q.device.type == "cpu" and native_cpu_decode_attention():
        return decode_attention_op(q, k, v, valid, scale, *(shared or ()))
    if shared is not None:
        return split_decode_attention(q, k, v, valid, *shared, scale)
    if q.device.type == "cpu":
        return decode_attention_op(q, k, v, valid, scale)
    return decode_attention_reference(q, k, v, valid, scale)


@functools.lru_cache(maxsize=None)
def native_cpu_decode_attention() -> bool:
    """Whether mplus_fast._C's CPU decode_attention is loaded (else the op runs its reference,
    which copies a shared prefix in front of every sequence: the split path is the better one)."""
    return has_native_kernel("decode_attention", "cpu")


def split_decode_attention(q, k, v, valid, k_shared, v_shared, scale: float):
    """q (B, Hq, 1, D) over [the batch-shared prefix k_shared/v_shared (1, Hkv, P_s, D), all
    visible | each sequence's cache k/v (B, Hkv, S, D) where `valid`], exactly, in two parts:
    the shared prefix by `memory_attention` (native CPU kernel, Triton on CUDA) with the batch's
    queries as query rows of one sequence, so each shared key is read once for the whole batch
    (its tail is empty: B masked zero keys); the per-sequence part in float32
    (`decode_attention_lse`); merged in float32 and rounded once to q's dtype."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    rows = q.transpose(0, 2).clone(memory_format=torch.contiguous_format)      # (1, Hq, B, D)
    no_tail = q.new_zeros(1, Hkv, B, D)
    out_s, lse_s = memory_attention(rows, k_shared, v_shared, None, None, None, no_tail, no_tail,
                                    torch.zeros(1, B, dtype=torch.bool, device=q.device), scale)
    out_c, lse_c = decode_attention_lse(q, k, v, valid, scale)
    out, _ = merge_attention_states(out_s.transpose(0, 2).float(), lse_s.transpose(0, 2), out_c, lse_c)
    return out.to(q.dtype)


def attention(q, k, v, mask):
    """Grouped-query attention with a boolean mask (True = attend), float32 softmax inside SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
