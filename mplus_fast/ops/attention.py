"""Op 4: memory attention (queries over [prefix rows | causal tail]) and the exact merge of two
partial attentions.

`torch.ops.mplus_fast.memory_attention(q, k_prefix, v_prefix, prefix_index, prefix_positions,
inv_freq, k_tail, v_tail, tail_mask, scale) -> (out, lse)`

    q                (B, Hq, n, D) float32/bfloat16/float16, already RoPE'd.
    k_prefix         (B or 1, Hkv, P_src, D), same dtype as q (batch 1 = shared by every sequence);
    v_prefix         same shape as k_prefix.
    prefix_index     optional (B, P) int64 in [0, P_src): rows used are k_prefix[b, :, prefix_index[b]]
                     (gathered on load); None = all P = P_src rows.
    prefix_positions optional (P,) or (B, P) int64, with inv_freq (D/2,) float32: the prefix keys are
                     stored pre-RoPE and RoPE (HF semantics, as rope_apply, attention_scaling 1,
                     rounded in the key dtype) is applied on load. Both None = keys used as stored.
    k_tail, v_tail   (B, Hkv, n, D): the prompt's own keys/values (already RoPE'd). Hq % Hkv == 0;
                     query head h reads kv head h // (Hq / Hkv).
    tail_mask        optional (B, n) bool, False = padding key (never attended).
    scale            multiplies the logits (1/sqrt(D) typically).
    returns out      (B, Hq, n, D) in q.dtype and lse (B, Hq, n) float32, the natural log-sum-exp of
                     the scaled logits over the attended keys (-inf and out = 0 where a query
                     attends to nothing, e.g. a padding query with P = 0).

    Mask: every query sees every prefix row; query i sees tail keys j <= i (bottom-right causal).
    Softmax and accumulation in float32.

`torch.ops.mplus_fast.merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)`

    out_a, out_b (..., D) same dtype; lse_a, lse_b (...) float32. The exact attention over the union
    of two disjoint key sets; an empty part (lse = -inf) contributes nothing and never makes NaN.

Kernels: reference = explicit fp32 attention with a materialised mask (the truth; here);
CPU = blocked online softmax in C++ (csrc/ops/attention.cpp), never an n x prefix tensor;
CUDA = Triton (mplus_fast/ops/triton/attention.py), registered below for the CUDA key when triton
is importable (no CUDA C++ kernel exists for these ops).
"""
from __future__ import annotations

import importlib.util
import math

import torch

from mplus_fast.ops._library import LIB, define_op
from mplus_fast.ops.rope import rope_apply_reference

__all__ = ["memory_attention", "merge_attention_states", "memory_attention_reference",
           "merge_attention_states_reference", "check_memory_attention_args"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t):
    return None if t is None else tuple(t.shape)


def check_memory_attention_args(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                                k_tail, v_tail, tail_mask) -> int:
    """Checks of the reference, fake and Triton paths (attention.cpp mirrors them). Returns P."""
    def bad(msg):
        raise ValueError(f"memory_attention: {msg}")

    if q.dim() != 4 or q.dtype not in _FLOAT_DTYPES or q.shape[-1] == 0:
        bad(f"q must be (B, Hq, n, D) float32/bfloat16/float16, got {_shape(q)} {q.dtype}")
    B, Hq, n, D = q.shape
    if k_tail.dim() != 4 or k_tail.shape[0] != B or k_tail.shape[2:] != (n, D) or k_tail.shape[1] == 0 \
            or Hq % k_tail.shape[1]:
        bad(f"k_tail must be (B={B}, Hkv, n={n}, D={D}) with Hq={Hq} divisible by Hkv, got {_shape(k_tail)}")
    Hkv = k_tail.shape[1]
    if v_tail.shape != k_tail.shape:
        bad(f"v_tail must have k_tail's shape {_shape(k_tail)}, got {_shape(v_tail)}")
    if k_prefix.dim() != 4 or k_prefix.shape[0] not in (1, B) or k_prefix.shape[1] != Hkv or k_prefix.shape[3] != D:
        bad(f"k_prefix must be (B={B} or 1, Hkv={Hkv}, P_src, D={D}), got {_shape(k_prefix)}")
    if v_prefix.shape != k_prefix.shape:
        bad(f"v_prefix must have k_prefix's shape {_shape(k_prefix)}, got {_shape(v_prefix)}")
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix), ("k_tail", k_tail), ("v_tail", v_tail)):
        if t.dtype != q.dtype or t.device != q.device:
            bad(f"{name} must match q's dtype {q.dtype} and device {q.device}, got {t.dtype} {t.device} {_shape(t)}")
    for name, t in (("prefix_index", prefix_index), ("prefix_positions", prefix_positions), ("inv_freq", inv_freq),
                    ("tail_mask", tail_mask)):
        if t is not None and t.device != q.device:
            bad(f"{name} is on {t.device} but q is on {q.device}: every argument must be on q's device "
                f"(move {name} with .to({str(q.device)!r}))")
    P = k_prefix.shape[2]
    if prefix_index is not None:
        if prefix_index.dtype != torch.int64 or prefix_index.dim() != 2 or prefix_index.shape[0] != B:
            bad(f"prefix_index must be int64 (B={B}, P) on {q.device}, got {_shape(prefix_index)} {prefix_index.dtype}")
        P = prefix_index.shape[1]
    if (prefix_positions is None) != (inv_freq is None):
        bad(f"prefix_positions and inv_freq go together, got {_shape(prefix_positions)} and {_shape(inv_freq)}")
    if prefix_positions is not None:
        if prefix_positions.dtype != torch.int64 or tuple(prefix_positions.shape) not in ((P,), (B, P)):
            bad(f"prefix_positions must be int64 of shape ({P},) or ({B}, {P}), got "
                f"{_shape(prefix_positions)} {prefix_positions.dtype}")
        if D % 2 or inv_freq.dtype != torch.float32 or tuple(inv_freq.shape) != (D // 2,):
            bad(f"inv_freq must be float32 of shape ({D // 2},) with D={D} even, got {_shape(inv_freq)} {inv_freq.dtype}")
    if tail_mask is not None and (tail_mask.dtype != torch.bool or tuple(tail_mask.shape) != (B, n)):
        bad(f"tail_mask must be bool of shape ({B}, {n}), got {_shape(tail_mask)} {tail_mask.dtype}")
    return P


def gather_prefix(k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq, batch: int):
    """The prefix K/V rows each sequence attends to, materialised: (B, Hkv, P, D) each."""
    kp = k_prefix.expand(batch, -1, -1, -1)
    vp = v_prefix.expand(batch, -1, -1, -1)
    if prefix_index is not None:
        idx = prefix_index[:, None, :, None].expand(-1, kp.shape[1], -1, kp.shape[3])  # (B, Hkv, P, D)
        kp, vp = torch.gather(kp, 2, idx), torch.gather(vp, 2, idx)
    if prefix_positions is not None:
        kp = rope_apply_reference(kp, prefix_positions, inv_freq)  # HF RoPE in the key dtype
    return kp, vp


def memory_attention_reference(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                               k_tail, v_tail, tail_mask, scale):
    check_memory_attention_args(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                                k_tail, v_tail, tail_mask)
    if prefix_index is not None and prefix_index.numel():  # as the native kernel: before anything is read
        src, lo, hi = k_prefix.shape[2], int(prefix_index.min()), int(prefix_index.max())
        if lo < 0 or hi >= src:
            raise ValueError(f"memory_attention: prefix_index {list(prefix_index.shape)} has values in [{lo}, {hi}], "
                             f"outside [0, {src})")
    B, Hq, n, D = q.shape
    group = Hq // k_tail.shape[1]
    kp, vp = gather_prefix(k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq, B)
    P = kp.shape[2]
    k = torch.cat((kp, k_tail), 2).float().repeat_interleave(group, dim=1)  # (B, Hq, P+n, D)
    v = torch.cat((vp, v_tail), 2).float().repeat_interleave(group, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", q.float(), k) * scale  # (B, Hq, n, P+n)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # bottom-right: key j <= query i
    allowed = torch.cat((torch.ones(n, P, dtype=torch.bool, device=q.device), causal), 1)  # (n, P+n)
    allowed = allowed.expand(B, n, P + n)
    if tail_mask is not None:
        allowed = allowed & torch.cat((torch.ones(B, P, dtype=torch.bool, device=q.device), tail_mask), 1)[:, None]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)  # (B, Hq, n), -inf where nothing is attended
    probs = torch.exp(logits - lse[..., None]).nan_to_num(nan=0.0)
    return (probs @ v).to(q.dtype), lse


def _memory_attention_fake(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                           k_tail, v_tail, tail_mask, scale):
    check_memory_attention_args(q, k_prefix, v_prefix, prefix_index, prefix_positions, inv_freq,
                                k_tail, v_tail, tail_mask)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def check_merge_args(out_a, lse_a, out_b, lse_b) -> None:
    if out_a.dim() < 1 or out_a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"merge_attention_states: out_a must be (..., D) float, got {_shape(out_a)} {out_a.dtype}")
    if out_b.shape != out_a.shape or out_b.dtype != out_a.dtype or out_b.device != out_a.device:
        raise ValueError(f"merge_attention_states: out_b must match out_a {_shape(out_a)} {out_a.dtype}, "
                         f"got {_shape(out_b)} {out_b.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.dtype != torch.float32 or t.shape != out_a.shape[:-1] or t.device != out_a.device:
            raise ValueError(f"merge_attention_states: {name} must be float32 of shape {_shape(out_a)[:-1]}, "
                             f"got {_shape(t)} {t.dtype}")


def merge_attention_states_reference(out_a, lse_a, out_b, lse_b):
    check_merge_args(out_a, lse_a, out_b, lse_b)
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)  # both empty: avoid -inf - -inf
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    out = (w_a[..., None] * out_a.float() + w_b[..., None] * out_b.float()) / torch.where(total == 0, 1.0, total)[..., None]
    lse = torch.where(total == 0, float("-inf"), top + torch.log(total))
    return out.to(out_a.dtype), lse


def _merge_fake(out_a, lse_a, out_b, lse_b):
    check_merge_args(out_a, lse_a, out_b, lse_b)
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape)


memory_attention = define_op(
    "memory_attention(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor? prefix_index, Tensor? prefix_positions, "
    "Tensor? inv_freq, Tensor k_tail, Tensor v_tail, Tensor? tail_mask, float scale) -> (Tensor out, Tensor lse)",
    memory_attention_reference,
    _memory_attention_fake,
)

merge_attention_states = define_op(
    "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)",
    merge_attention_states_reference,
    _merge_fake,
)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# CUDA: the Triton kernels (no CUDA C++ kernel exists for these ops). Registered only when triton is
# importable; triton itself is imported on first call, so importing this module never touches CUDA.
if importlib.util.find_spec("triton") is not None:
    def _memory_attention_cuda(*args):
        from mplus_fast.ops.triton.attention import memory_attention_triton
        return memory_attention_triton(*args)

    def _merge_cuda(*args):
        from mplus_fast.ops.triton.attention import merge_attention_states_triton
        return merge_attention_states_triton(*args)

    LIB.impl("memory_attention", _memory_attention_cuda, "CUDA")
    LIB.impl("merge_attention_states", _merge_cuda, "CUDA")
