"""Op 6: the memory-bound halves of a one-token decode step on the CPU.

`torch.ops.mplus_fast.decode_gemv(x, w) -> Tensor`

    x        (M, K) float32 / bfloat16 / float16, M small (the decoded rows), any row stride.
    w        (K, N) of x's dtype, stored (in, out) as the fast backend keeps its projections.
    returns  (M, N) = x @ w, float32 accumulation, x's dtype.

`torch.ops.mplus_fast.decode_attention(q, k, v, valid, scale, k_shared=None, v_shared=None) -> Tensor`

    q        (B, Hq, 1, D) float32 / bfloat16 / float16: one query token per sequence.
    k, v     (B, Hkv, S, D) of q's dtype, Hq divisible by Hkv (GQA: query head h reads kv head
             h // (Hq / Hkv)); the static decode cache, keys already rotated.
    valid    (B, S) bool: the keys each sequence may attend (written slots, not padding).
    scale    softmax scale (head_dim ** -0.5).
    k_shared, v_shared  optional (1, Hkv, P, D) of q's dtype, given together: a prefix every
             sequence attends besides its own cache, all of it visible (the batch-shared
             [bos | STM], keys rotated). Attention runs over [shared | own] as one softmax.
    returns  (B, Hq, 1, D) contiguous: softmax(q·kᵀ·scale over valid keys) · v; a row with no
             valid key is zero (as SDPA's fused kernels).

`decode_attention_lse(q, k, v, valid, scale) -> (out, lse)` (plain PyTorch, every device; not an op)

    The same attention returning float32 `out` (B, Hq, 1, D) and its log-sum-exp `lse` (B, Hq, 1)
    (-inf for a row with no valid key, whose `out` is zero): the per-sequence part of a decode step
    whose batch-shared prefix is attended separately and merged (`backends/dispatch.py`).

Kernels: CPU (csrc/ops/decode.cpp): column-blocked GEMV reading each weight once; split-key
attention sharing every K/V row among the query heads of its group (a shared prefix's rows among
those of the whole batch), merged by log-sum-exp. On a GPU the engine calls cuBLAS / SDPA
directly (these references; with a shared prefix `backends/dispatch.split_decode_attention`), so
there are no CUDA kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplus_fast.ops._library import define_op

__all__ = ["decode_gemv", "decode_attention", "decode_gemv_reference", "decode_attention_reference",
           "decode_attention_lse"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_decode_gemv_args(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"decode_gemv: x must be (M, K) float32/bfloat16/float16, got {tuple(x.shape)} {x.dtype}")
    if w.dim() != 2 or w.shape[0] != x.shape[1] or w.dtype != x.dtype:
        raise ValueError(f"decode_gemv: w must be (K={x.shape[1]}, N) of x's dtype {x.dtype}, got {tuple(w.shape)} {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"decode_gemv: x ({x.device}) and w ({w.device}) must share a device")


def check_decode_attention_args(q, k, v, valid, k_shared=None, v_shared=None) -> None:
    if q.dim() != 4 or q.shape[2] != 1 or q.dtype not in _FLOAT_DTYPES or q.shape[3] == 0:
        raise ValueError(f"decode_attention: q must be (B, Hq, 1, D) float32/bfloat16/float16, got {tuple(q.shape)} {q.dtype}")
    B, Hq, _, D = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[1] == 0 or Hq % k.shape[1] or k.shape[3] != D or k.dtype != q.dtype:
        raise ValueError(f"decode_attention: k must be (B={B}, Hkv, S, D={D}) of q's dtype with Hq={Hq} divisible by "
                         f"Hkv, got {tuple(k.shape)} {k.dtype}")
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"decode_attention: v must have k's shape {tuple(k.shape)} and dtype, got {tuple(v.shape)} {v.dtype}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (B, k.shape[2]):
        raise ValueError(f"decode_attention: valid must be bool (B={B}, S={k.shape[2]}), got {tuple(valid.shape)} {valid.dtype}")
    if not (k.device == v.device == valid.device == q.device):
        raise ValueError("decode_attention: q, k, v and valid must share a device")
    if (k_shared is None) != (v_shared is None):
        raise ValueError("decode_attention: k_shared and v_shared must be given together")
    if k_shared is None:
        return
    ks = k_shared
    if ks.dim() != 4 or ks.shape[0] != 1 or ks.shape[1] != k.shape[1] or ks.shape[3] != D or ks.dtype != q.dtype:
        raise ValueError(f"decode_attention: k_shared must be (1, Hkv={k.shape[1]}, P, D={D}) of q's dtype, got "
                         f"{tuple(ks.shape)} {ks.dtype}")
    if v_shared.shape != ks.shape or v_shared.dtype != ks.dtype:
        raise ValueError(f"decode_attention: v_shared must have k_shared's shape {tuple(ks.shape)} and dtype, got "
                         f"{tuple(v_shared.shape)} {v_shared.dtype}")
    if not (ks.device == v_shared.device == q.device):
        raise ValueError("decode_attention: k_shared and v_shared must be on q's device")


def decode_gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    check_decode_gemv_args(x, w)
    return x @ w


def decode_attention_reference(q, k, v, valid, scale: float, k_shared=None, v_shared=None) -> torch.Tensor:
    """The G = Hq/Hkv query heads of a kv head become G query rows of it, so SDPA reads each kv
    head once (no repeat of K/V to Hq heads) and can use its fused kernels. A shared prefix is
    copied in front of every sequence's keys (all visible)."""
    check_decode_attention_args(q, k, v, valid, k_shared, v_shared)
    B, Hq, _, D = q.shape
    if k_shared is not None:
        k = torch.cat([k_shared.expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([v_shared.expand(B, -1, -1, -1), v], dim=2)
        valid = torch.cat([valid.new_ones(B, k_shared.shape[2]), valid], dim=1)
    Hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale)
    return out.reshape(B, Hq, 1, D).contiguous()


def decode_attention_lse(q, k, v, valid, scale: float):
    """See the module doc. Logits, softmax and the sum over values in float32 (as the native
    kernel and SDPA accumulate); the K/V of a kv head are read once for its G query heads."""
    check_decode_attention_args(q, k, v, valid)
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D).float()                               # (B, Hkv, G, D)
    logits = torch.matmul(qg, k.float().transpose(2, 3)) * scale               # (B, Hkv, G, S)
    logits = torch.where(valid[:, None, None, :], logits, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                                      # (B, Hkv, G)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(nan=0.0)             # a row with no valid key: 0
    out = torch.matmul(probs, v.float())                                       # (B, Hkv, G, D)
    return out.reshape(B, Hq, 1, D), lse.reshape(B, Hq, 1)


def _gemv_fake(x, w):
    check_decode_gemv_args(x, w)
    return x.new_empty(x.shape[0], w.shape[1])


def _attention_fake(q, k, v, valid, scale, k_shared=None, v_shared=None):
    check_decode_attention_args(q, k, v, valid, k_shared, v_shared)
    return q.new_empty(q.shape)


decode_gemv = define_op("decode_gemv(Tensor x, Tensor w) -> Tensor", decode_gemv_reference, _gemv_fake)
decode_attention = define_op("decode_attention(Tensor q, Tensor k, Tensor v, Tensor valid, float scale, "
                             "Tensor? k_shared=None, Tensor? v_shared=None) -> Tensor",
                             decode_attention_reference, _attention_fake)
