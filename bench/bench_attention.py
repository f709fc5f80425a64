"""Benchmarks of mplus_fast::memory_attention: reference vs native (CPU C++ / CUDA Triton) vs torch
SDPA over the concatenated keys with an explicit bottom-right mask (the baseline the issue names).

Shapes: "cpu-small" (128 queries x 16 heads (4 kv) x 2,600 prefix rows, D 64, fp32) always runs;
"cpu-small-gather-rope" adds gather-by-index and RoPE on load (the baseline then gathers, rotates
with the rope reference and concatenates before SDPA); "released" (512 x 32 heads (8 kv) x 12,801
prefix rows, D 128; bf16 on GPU, fp32 on CPU) runs on CUDA or when MPLUS_FAST_BENCH_BIG=1.
Untimed in CI: `pytest bench --benchmark-disable` runs every case once.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.attention import gather_prefix, memory_attention_reference
from mplus_fast.ops.testing import skip_unless_native

CUDA = torch.cuda.is_available()
BIG = CUDA or os.environ.get("MPLUS_FAST_BENCH_BIG") == "1"
DEVICE = "cuda" if CUDA else "cpu"

SHAPES = {  # name: (B, Hq, Hkv, n, P, D, gather+rope, dtype)
    "cpu-small": (1, 16, 4, 128, 2600, 64, False, torch.float32),
    "cpu-small-gather-rope": (1, 16, 4, 128, 2600, 64, True, torch.float32),
    "released": (1, 32, 8, 512, 12801, 128, True, torch.bfloat16 if CUDA else torch.float32),
}


def inputs(B, Hq, Hkv, n, P, D, gather, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    q, kt, vt = r(B, Hq, n, D), r(B, Hkv, n, D), r(B, Hkv, n, D)
    if gather:  # a bank twice the size, rows picked by index, stored pre-RoPE
        kp, vp = r(1, Hkv, 2 * P, D), r(1, Hkv, 2 * P, D)
        idx = torch.randperm(2 * P, generator=g)[:P].repeat(B, 1).to(DEVICE)
        pos = torch.arange(1, P + 1).to(DEVICE)
        freq = (1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(DEVICE)
    else:
        kp, vp, idx, pos, freq = r(1, Hkv, P, D), r(1, Hkv, P, D), None, None, None
    return (q, kp, vp, idx, pos, freq, kt, vt, None, D ** -0.5)


def sdpa_baseline(q, kp, vp, idx, pos, freq, kt, vt, tmask, scale):
    B, _, n, _ = q.shape
    kg, vg = gather_prefix(kp, vp, idx, pos, freq, B)
    k, v = torch.cat((kg, kt), 2), torch.cat((vg, vt), 2)
    P = kg.shape[2]
    mask = torch.ones(n, P + n, dtype=torch.bool, device=q.device).tril(P)  # bottom-right causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


IMPLS = {
    "reference": memory_attention_reference,
    "native": torch.ops.mplus_fast.memory_attention,  # CPU: C++ kernel; CUDA: Triton
    "sdpa-mask": sdpa_baseline,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_memory_attention(benchmark, impl, shape):
    if shape == "released" and not BIG:
        pytest.skip("released geometry: CUDA or MPLUS_FAST_BENCH_BIG=1")
    if shape == "released" and impl == "reference" and not CUDA:
        pytest.skip("the materialising reference at the released geometry needs ~7 GB")
    if impl == "native":
        skip_unless_native("memory_attention", DEVICE)
    B, Hq, Hkv, n, P, D, gather, dtype = SHAPES[shape]
    args = inputs(*SHAPES[shape])
    fn = IMPLS[impl]

    def run():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out

    flops = 4 * B * Hq * n * D * (P + (n + 1) / 2)  # QK^T + PV over prefix + causal tail
    nbytes = (2 * B * Hq * n * D + 2 * B * Hkv * (P + n) * D) * args[0].element_size() + B * Hq * n * 4
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
                                threads=torch.get_num_threads(), flops=flops, bytes=nbytes, dtype=str(dtype))
    benchmark.pedantic(run, rounds=3 if not CUDA else 10, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.min > 0:
        benchmark.extra_info["TFLOP/s"] = flops / stats.stats.min / 1e12
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.min / 1e9
