"""Benchmarks of mplus_fast::rope_apply: the op's reference, the fast backend's own Python path
(`mplus_fast.rope.apply_rope`, what the engine calls: no checks, no forced copy) and the native
kernel (CPU C++ / CUDA).

Shapes: the released geometry's prompt queries (1 x 32 heads x 512 x 128) and a layer's memory
keys (1 x 8 heads x 12,801 x 128); the CPU-mid engine's calls: a 32-token prompt's queries
(1 x 16 x 32 x 64), the STM keys of all 8 layers rotated after an update (8 x 4 x 2,560 x 64)
and a decode step's query (1 x 16 x 1 x 64). bf16 and fp32. Run untimed in CI.
"""
from __future__ import annotations

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.rope import rope_apply_reference
from mplus_fast.ops.testing import skip_unless_native
from mplus_fast.rope import apply_rope

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {"queries-512": (1, 32, 512, 128), "memory-keys-12801": (1, 8, 12801, 128),
          "mid-prompt-q32": (1, 16, 32, 64), "mid-stm-keys": (8, 4, 2560, 64), "mid-decode-q": (1, 16, 1, 64)}
IMPLS = {"reference": rope_apply_reference, "engine": apply_rope, "native": torch.ops.mplus_fast.rope_apply}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rope_apply(benchmark, shape, impl, dtype):
    if impl == "native":
        skip_unless_native("rope_apply", DEVICE)
    B, H, S, D = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, S, D, generator=g).to(dtype).to(DEVICE)
    pos = torch.randperm(20000, generator=g)[:S].repeat(B, 1).to(DEVICE)
    freq = (1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(DEVICE)
    fn = IMPLS[impl]

    def run():
        out = fn(x, pos, freq, 1.0)
        if CUDA:
            torch.cuda.synchronize()
        return out

    nbytes = 2 * x.numel() * x.element_size() + pos.numel() * 8
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
                                flops=6 * x.numel(), bytes=nbytes)
    benchmark.pedantic(run, rounds=5 if S > 64 else 50, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.min > 0:
        benchmark.extra_info["GB/s"] = nbytes / stats.stats.min / 1e9
