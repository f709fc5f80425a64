"""Benchmarks of mplus_fast::decode_gemv and decode_attention (CPU kernels) vs their references
(BLAS `x @ w`; SDPA with the query group as rows), on the CPU-mid decode shapes: the projections
of one layer plus the lm_head (weights evicted from cache between calls, as in a real step, where
~500 MB of weights stream through), and one layer's attention over a 3,340-row cache.
Reported in GB/s of the bytes each op must read; run untimed in CI.
"""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.backends.dispatch import split_decode_attention
from mplus_fast.ops.decode import decode_attention_reference, decode_gemv_reference
from mplus_fast.ops.testing import skip_unless_native

GEMV = {"reference": decode_gemv_reference, "native": torch.ops.mplus_fast.decode_gemv}
ATT = {"reference": decode_attention_reference, "native": torch.ops.mplus_fast.decode_attention}
# (K, N): fused QKV, o_proj, gate|up, down of the CPU-mid layer, and its lm_head.
GEMV_SHAPES = {"qkv": (1024, 1536), "gate-up": (1024, 5632), "down": (2816, 1024), "lm-head": (1024, 32000)}
_EVICT = torch.empty(64 * 2**20 // 4)   # 64 MB: larger than the last-level cache


def _evict():
    _EVICT.fill_(1.0)


def _record(benchmark, nbytes):
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), bytes=nbytes)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.median / 1e9


@pytest.mark.parametrize("impl", list(GEMV))
@pytest.mark.parametrize("shape", list(GEMV_SHAPES))
def test_decode_gemv(benchmark, shape, impl):
    if impl == "native":
        skip_unless_native("decode_gemv")
    K, N = GEMV_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, K, generator=g), torch.randn(K, N, generator=g)
    fn = GEMV[impl]
    benchmark.pedantic(fn, args=(x, w), setup=_evict, rounds=10, warmup_rounds=1)
    _record(benchmark, w.numel() * 4)


@pytest.mark.parametrize("impl", list(ATT))
def test_decode_attention(benchmark, impl):
    if impl == "native":
        skip_unless_native("decode_attention")
    B, Hq, Hkv, S, D = 1, 16, 4, 3340, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[:, -20:] = False                    # unwritten slots of the static cache
    fn = ATT[impl]
    benchmark.pedantic(fn, args=(q, k, v, valid, D ** -0.5), setup=_evict, rounds=10,
                       warmup_rounds=1)
    _record(benchmark, 2 * k.numel() * 4)


# The fast backend's decode layout: the batch-shared [bos | STM] (1, Hkv, 1+N, D) attended in place
# besides each sequence's [LTM | prompt | new] cache. "split": the two-part path the GPU takes
# (memory_attention + float32 torch + log-sum-exp merge), run here on the CPU for comparison.
SHARED = {"reference": decode_attention_reference, "native": torch.ops.mplus_fast.decode_attention,
          "split": lambda q, k, v, valid, scale, ks, vs: split_decode_attention(q, k, v, valid, ks, vs, scale)}


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("impl", list(SHARED))
def test_decode_attention_shared(benchmark, impl, B):
    if impl == "native":
        skip_unless_native("decode_attention")
    Hq, Hkv, P, S, D = 16, 4, 2561, 720, 64   # CPU mid: 1 + 40·64 shared rows, 640 LTM + prompt + new
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g)
    ks, vs = torch.randn(1, Hkv, P, D, generator=g), torch.randn(1, Hkv, P, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[:, -20:] = False
    benchmark.pedantic(SHARED[impl], args=(q, k, v, valid, D ** -0.5, ks, vs), setup=_evict, rounds=10,
                       warmup_rounds=1)
    _record(benchmark, 2 * (ks.numel() + k.numel()) * 4)
