"""topk_ascending: the reference (a stable sort of every score) vs the native selection (radix
select + stable compaction), on a retrieval score row: bf16-rounded means of sigmoids (clustered
near 0.5, thousands of exact ties) and float32 scores.

Shapes: a CPU-mid layer (20,000 keys, k 640) always (untimed in CI); the released layer (153,600
keys, k 2,560) on CUDA or with MPLUS_BENCH_FULL=1.
"""
from __future__ import annotations

import os

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.testing import skip_unless_native
from mplus_fast.ops.topk import topk_ascending_reference

CUDA = torch.cuda.is_available()
FULL = CUDA or os.environ.get("MPLUS_BENCH_FULL", "0") == "1"
SHAPES = {"mid": (1, 20_000, 640)}  # (B, n, k)
if FULL:
    SHAPES["released"] = (1, 153_600, 2_560)
IMPLS = {"reference": topk_ascending_reference, "native": torch.ops.mplus_fast.topk_ascending}


def scores_for(B, n, rounded, device):
    g = torch.Generator().manual_seed(0)
    s = torch.sigmoid(torch.randn(B, n, generator=g) * 0.05)  # a mean of sigmoids: near 0.5
    return (s.bfloat16().float() if rounded else s).to(device)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("rounded", [True, False], ids=["bf16-scores", "f32-scores"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_topk_ascending(benchmark, impl, shape, rounded, device):
    if impl == "native":
        skip_unless_native("topk_ascending", device)
    B, n, k = SHAPES[shape]
    scores = scores_for(B, n, rounded, device)
    fn = IMPLS[impl]

    def run():
        out = fn(scores, k)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    idx, _ = benchmark(run)
    assert idx.shape == (B, k)
    nbytes = B * n * 4
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                torch=torch.__version__, threads=torch.get_num_threads(), bytes=nbytes, flops=0)
    if benchmark.stats is not None and getattr(benchmark.stats, "stats", None) is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
