"""Triton scoring kernel for retrieval_topk (GPU; CPU only under TRITON_INTERPRET=1).

Not registered with the dispatcher: the native CUDA kernel (tensor cores through WMMA) is the
op's CUDA implementation. This is the explicit alternative `retrieval_topk_triton` (same contract
as the op), benchmarked against it on GPUs; its tl.dot uses tensor cores for bf16/fp16 inputs
(float32 accumulation); float32 inputs use IEEE float32 products (no TF32), to match the
reference's float32 GEMM. One program owns BLOCK_K keys and sweeps the queries in BLOCK_Q
tiles: GEMM tile, the SPEC §10 rounding, sigmoid, masked column sum, all in registers; the
n x (M + E) matrix is never written. Extra keys are handled by the caller concatenating nothing:
two passes of the same kernel write the two column ranges of one score buffer.

Rounding (`round_to`): bf16/fp16 inputs round the float32 dot product to their dtype, the sigmoid
(1 / (1 + exp(-x)), libdevice's accurate exp on a GPU) to it, and the mean (float32 sum / count)
to it. `round_to` may also be given with float32 inputs holding bf16/fp16 values: the same
arithmetic with IEEE float32 products, which is how the interpreter tests it (its bf16 tl.dot is
not trustworthy). Top-k: `torch.ops.mplus_fast.topk_ascending` (selection, no sort).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mplus_fast.ops.retrieval import check_args, cyclic_indices

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round(x, ROUND: tl.constexpr):
    """float32 x rounded to bf16 (1) / fp16 (2) and back, to nearest even; 0: unchanged. bf16 by
    bit arithmetic: the interpreter's float32 -> bf16 cast truncates (rtne ignored)."""
    if ROUND == 1:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _scores_kernel(q_ptr, k_ptr, mask_ptr, cnt_ptr, out_ptr, n, mk, s,
                   q_sb, q_sn, k_s0, m_sb, m_sn, out_sb, col0,
                   HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ROUND: tl.constexpr, LIBDEVICE: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_k = tl.program_id(0)
    b = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < mk
    colsum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for q0 in range(0, n, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        qmask = offs_q < n
        acc = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.float32)
        for s0 in range(0, s, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            smask = offs_s < s
            qt = tl.load(q_ptr + b * q_sb + offs_q[:, None] * q_sn + offs_s[None, :],
                         mask=qmask[:, None] & smask[None, :], other=0.0)
            kt = tl.load(k_ptr + offs_k[None, :] * k_s0 + offs_s[:, None],
                         mask=kmask[None, :] & smask[:, None], other=0.0)
            acc += tl.dot(qt, kt, input_precision=PRECISION)
        w = qmask
        if HAS_MASK:
            w = w & (tl.load(mask_ptr + b * m_sb + offs_q * m_sn, mask=qmask, other=0) != 0)
        x = _round(acc, ROUND)
        if LIBDEVICE:
            e = libdevice.exp(-x)
        else:
            e = tl.exp(-x)
        sig = _round(1.0 / (1.0 + e), ROUND)
        colsum += tl.sum(tl.where(w[:, None], sig, 0.0), axis=0)
    cnt = tl.load(cnt_ptr + b)
    mean = _round(colsum / tl.maximum(cnt, 1.0), ROUND)
    tl.store(out_ptr + b * out_sb + col0 + offs_k, tl.where(cnt > 0, mean, 0.0), mask=kmask)


def retrieval_scores_triton(queries, keys, extra_keys=None, query_mask=None, round_to=None,
                            block_q=64, block_k=64, block_s=32):
    """(B, M+E) float32 scores (see mplus_fast.ops.retrieval), rounded as `round_to` (default:
    the inputs' dtype) is rounded by SPEC §10."""
    B, n, s = queries.shape
    rnd = ROUND[round_to if round_to is not None else queries.dtype]
    blocks = [keys] + ([extra_keys] if extra_keys is not None and extra_keys.shape[0] else [])
    total = sum(t.shape[0] for t in blocks)
    out = torch.empty((B, total), dtype=torch.float32, device=queries.device)
    if B == 0 or total == 0:
        return out
    q = queries if queries.stride(-1) == 1 else queries.contiguous()
    if query_mask is not None:
        cnt = query_mask.sum(1).to(torch.float32)
        mask = query_mask.to(torch.uint8)
    else:
        cnt = torch.full((B,), float(n), dtype=torch.float32, device=queries.device)
        mask = torch.ones((1, 1), dtype=torch.uint8, device=queries.device)
    col0 = 0
    for kb in blocks:
        kb = kb if kb.stride(-1) == 1 else kb.contiguous()
        mk = kb.shape[0]
        grid = (triton.cdiv(mk, block_k), B)
        _scores_kernel[grid](q, kb, mask, cnt, out, n, mk, s, q.stride(0), q.stride(1), kb.stride(0),
                             mask.stride(0), mask.stride(1), out.stride(0), col0,
                             HAS_MASK=query_mask is not None,
                             PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                             ROUND=rnd, LIBDEVICE=not _INTERPRET,
                             BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_S=block_s)
        col0 += mk
    return out


def retrieval_topk_triton(queries, keys, extra_keys=None, k: int = 1, query_mask=None, round_to=None):
    """Same contract as torch.ops.mplus_fast.retrieval_topk, scores from the Triton kernel."""
    check_args(queries, keys, extra_keys, k, query_mask)
    B, m = queries.shape[0], keys.shape[0]
    if m < k:
        return cyclic_indices(m, k, B, queries.device), queries.new_zeros((B, k), dtype=torch.float32)
    scores = retrieval_scores_triton(queries, keys, extra_keys, query_mask, round_to)
    return torch.ops.mplus_fast.topk_ascending(scores, k)
