"""Triton kernels of mplus_fast::memory_attention and mplus_fast::merge_attention_states (GPU path).

Design: one program per (query block, batch x query head); online softmax in float32 (exp2 with
the scale folded in) over two loops: (1) the prefix rows, gathered on load through prefix_index and,
when positions are given, rotated on load with HF RoPE (float32 angle, cos/sin/products/sum rounded
to the key dtype, as the eager reference does); (2) the prompt's own keys up to the block's last
query, masked bottom-right causal and by tail_mask. Head dim is processed as two halves (the RoPE
pairs), so odd/non-power-of-two widths only cost masking. GQA by indexing kv head h // group (each
query head re-reads its kv head; packing the group's heads into one program is a later optimisation).
Returns out and the natural-log lse (-inf, out 0 where nothing is attended).

Under TRITON_INTERPRET=1 these run on CPU tensors (tests do so in float32; the interpreter's
bf16 tl.dot is not trustworthy). On a GPU, precise libdevice cos/sin are used for RoPE.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from mplus_fast.ops.attention import check_memory_attention_args, check_merge_args

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_step(s, m_i, l_i, acc1, acc2, v1, v2, IEEE: tl.constexpr):
    """One online-softmax step; s: (M, N) log2-scaled logits with -inf where masked."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p.to(v1.dtype)
    acc1 = acc1 * alpha[:, None] + _dot(pv, v1, IEEE)
    acc2 = acc2 * alpha[:, None] + _dot(pv, v2, IEEE)
    return m_new, l_i, acc1, acc2


@triton.jit
def _memory_attention_fwd(
    Q, KP, VP, IDX, POS, FREQ, KT, VT, TMASK, OUT, LSE,
    sq_b, sq_h, sq_n, sq_d, skp_b, skp_h, skp_p, skp_d, svp_b, svp_h, svp_p, svp_d,
    si_b, si_p, spos_b, spos_p, skt_b, skt_h, skt_n, skt_d, svt_b, svt_h, svt_n, svt_d,
    stm_b, stm_n, so_b, so_h, so_n, so_d, sl_b, sl_h, sl_n,
    Hq, n, P, qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_ROPE: tl.constexpr,
    HAS_TMASK: tl.constexpr, IEEE: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)  # 64-bit offsets: banks can exceed 2^31 elements
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_H)
    d1 = offs_d < HALF  # first half: dims [0, HALF)
    d2 = offs_d < D - HALF  # second half: dims [HALF, D)
    m_ok = offs_m < n
    q_rows = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n
    q1 = tl.load(q_rows + offs_d[None, :] * sq_d, mask=m_ok[:, None] & d1[None, :], other=0.0)
    q2 = tl.load(q_rows + (offs_d[None, :] + HALF) * sq_d, mask=m_ok[:, None] & d2[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    if HAS_ROPE:
        freq = tl.load(FREQ + offs_d, mask=d1, other=0.0)

    # (1) prefix rows: every query sees every row.
    for start in range(0, P, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        if HAS_INDEX:
            rows = tl.load(IDX + b * si_b + offs_n * si_p, mask=n_ok, other=0)
        else:
            rows = offs_n
        k_rows = KP + b * skp_b + hk * skp_h + rows[:, None] * skp_p
        k1 = tl.load(k_rows + offs_d[None, :] * skp_d, mask=n_ok[:, None] & d1[None, :], other=0.0)
        k2 = tl.load(k_rows + (offs_d[None, :] + HALF) * skp_d, mask=n_ok[:, None] & d2[None, :], other=0.0)
        if HAS_ROPE:
            pos = tl.load(POS + b * spos_b + offs_n * spos_p, mask=n_ok, other=0).to(tl.float32)
            ang = pos[:, None] * freq[None, :]
            if LIBDEVICE:
                c = libdevice.cos(ang)
                sn = libdevice.sin(ang)
            else:
                c = tl.cos(ang)
                sn = tl.sin(ang)
            kdt = k1.dtype
            c = c.to(kdt).to(tl.float32)
            sn = sn.to(kdt).to(tl.float32)
            k1f = k1.to(tl.float32)
            k2f = k2.to(tl.float32)
            r1 = (k1f * c).to(kdt).to(tl.float32) + (-(k2f * sn)).to(kdt).to(tl.float32)
            r2 = (k2f * c).to(kdt).to(tl.float32) + (k1f * sn).to(kdt).to(tl.float32)
            k1 = r1.to(kdt)
            k2 = r2.to(kdt)
        s = _dot(q1, tl.trans(k1), IEEE) + _dot(q2, tl.trans(k2), IEEE)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        v_rows = VP + b * svp_b + hk * svp_h + rows[:, None] * svp_p
        v1 = tl.load(v_rows + offs_d[None, :] * svp_d, mask=n_ok[:, None] & d1[None, :], other=0.0)
        v2 = tl.load(v_rows + (offs_d[None, :] + HALF) * svp_d, mask=n_ok[:, None] & d2[None, :], other=0.0)
        m_i, l_i, acc1, acc2 = _online_step(s, m_i, l_i, acc1, acc2, v1, v2, IEEE)

    # (2) the prompt's own keys, bottom-right causal: query i sees tail key j <= i.
    hi = tl.minimum((pid_m + 1) * BLOCK_M, n)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        k_rows = KT + b * skt_b + hk * skt_h + offs_n[:, None] * skt_n
        k1 = tl.load(k_rows + offs_d[None, :] * skt_d, mask=n_ok[:, None] & d1[None, :], other=0.0)
        k2 = tl.load(k_rows + (offs_d[None, :] + HALF) * skt_d, mask=n_ok[:, None] & d2[None, :], other=0.0)
        s = _dot(q1, tl.trans(k1), IEEE) + _dot(q2, tl.trans(k2), IEEE)
        allowed = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
        if HAS_TMASK:
            tm = tl.load(TMASK + b * stm_b + offs_n * stm_n, mask=n_ok, other=0)
            allowed = allowed & (tm[None, :] != 0)
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        v_rows = VT + b * svt_b + hk * svt_h + offs_n[:, None] * svt_n
        v1 = tl.load(v_rows + offs_d[None, :] * svt_d, mask=n_ok[:, None] & d1[None, :], other=0.0)
        v2 = tl.load(v_rows + (offs_d[None, :] + HALF) * svt_d, mask=n_ok[:, None] & d2[None, :], other=0.0)
        m_i, l_i, acc1, acc2 = _online_step(s, m_i, l_i, acc1, acc2, v1, v2, IEEE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_rows = OUT + b * so_b + h * so_h + offs_m[:, None] * so_n
    tl.store(o_rows + offs_d[None, :] * so_d, (acc1 / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & d1[None, :])
    tl.store(o_rows + (offs_d[None, :] + HALF) * so_d, (acc2 / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & d2[None, :])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + b * sl_b + h * sl_h + offs_m * sl_n, lse, mask=m_ok)


def memory_attention_triton(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                            k_tail, v_tail, tail_mask, scale, block_m: int | None = None, block_n: int | None = None):
    """Launch the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    P = check_memory_attention_args(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                                    k_tail, v_tail, tail_mask)
    B, Hq, n, D = q.shape
    Hkv = k_tail.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse.fill_(float("-inf")) if lse.numel() else lse
    if prefix_index is not None and prefix_index.numel() and q.is_cuda:
        src = k_prefix.shape[2]
        torch._assert_async(((prefix_index >= 0) & (prefix_index < src)).all(),
                            "memory_attention: prefix_index out of range [0, P_src)")
    elif prefix_index is not None and prefix_index.numel():
        src = k_prefix.shape[2]
        if int(prefix_index.min()) < 0 or int(prefix_index.max()) >= src:
            raise ValueError(f"memory_attention: prefix_index {tuple(prefix_index.shape)} has values outside [0, {src})")
    half = (D + 1) // 2
    block_h = max(16, triton.next_power_of_2(half))
    if block_m is None:
        block_m = 16 if _INTERPRET else (64 if block_h >= 64 else 128)
    if block_n is None:
        block_n = 16 if _INTERPRET else 64
    dummy = q  # placeholder pointer for absent optional tensors (never dereferenced)
    idx = prefix_index if prefix_index is not None else dummy
    pos = prefix_positions if prefix_positions is not None else dummy
    freq = inv_freq.contiguous() if inv_freq is not None else dummy
    tmask = tail_mask.view(torch.uint8) if tail_mask is not None else dummy
    kp_b = 0 if k_prefix.shape[0] == 1 else k_prefix.stride(0)
    vp_b = 0 if v_prefix.shape[0] == 1 else v_prefix.stride(0)
    si = (prefix_index.stride(0), prefix_index.stride(1)) if prefix_index is not None else (0, 0)
    if prefix_positions is not None:
        spos = (prefix_positions.stride(0), prefix_positions.stride(1)) if prefix_positions.dim() == 2 \
            else (0, prefix_positions.stride(0))
    else:
        spos = (0, 0)
    stm = (tail_mask.stride(0), tail_mask.stride(1)) if tail_mask is not None else (0, 0)
    grid = (triton.cdiv(n, block_m), B * Hq)
    _memory_attention_fwd[grid](
        q, k_prefix, v_prefix, idx, pos, freq, k_tail, v_tail, tmask, out, lse,
        *q.stride(), kp_b, *k_prefix.stride()[1:], vp_b, *v_prefix.stride()[1:],
        *si, *spos, *k_tail.stride(), *v_tail.stride(), *stm, *out.stride(), *lse.stride(),
        Hq, n, P, float(scale) * LOG2E,
        GROUP=Hq // Hkv, D=D, HALF=half, BLOCK_H=block_h, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_INDEX=prefix_index is not None, HAS_ROPE=prefix_positions is not None,
        HAS_TMASK=tail_mask is not None, IEEE=q.dtype == torch.float32, LIBDEVICE=not _INTERPRET,
        num_warps=4, num_stages=2 if q.dtype == torch.float32 else 3,  # fp32 tiles: keep smem < 227 KB
    )
    return out, lse


@triton.jit
def _merge_fwd(OA, LA, OB, LB, OUT, LSE, D, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    la = tl.load(LA + r)
    lb = tl.load(LB + r)
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    total = wa + wb
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    oa = tl.load(OA + r * D + offs, mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(OB + r * D + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + r * D + offs, ((wa * oa + wb * ob) * inv).to(OUT.dtype.element_ty), mask=ok)
    tl.store(LSE + r, tl.where(total == 0.0, float("-inf"), top + tl.log(tl.where(total == 0.0, 1.0, total))))


def merge_attention_states_triton(out_a, lse_a, out_b, lse_b):
    check_merge_args(out_a, lse_a, out_b, lse_b)
    oa, ob = out_a.contiguous(), out_b.contiguous()
    la, lb = lse_a.contiguous(), lse_b.contiguous()
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    D = oa.shape[-1]
    rows = la.numel()
    if rows and D:
        _merge_fwd[(rows,)](oa, la, ob, lb, out, lse, D, BLOCK_D=triton.next_power_of_2(D))
    elif rows:
        lse.copy_(torch.logaddexp(la, lb))
    return out, lse


__all__ = ["memory_attention_triton", "merge_attention_states_triton"]
