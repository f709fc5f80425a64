"""stm_update_ (vs the reference's drop-and-concatenate and the op's reference).

Small shapes always (untimed in CI); the released geometry (N 10,240, T 256, d 4,096) when CUDA
is available or MPLUS_BENCH_FULL=1. The native rows skip when the kernel is not loaded.
"""
from __future__ import annotations

import os

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops.insertion import drop_and_concat_reference, stm_update_reference
from mplus_fast.ops.testing import skip_unless_native

FULL = os.environ.get("MPLUS_BENCH_FULL", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
STM_SHAPES = {"small": (1, 1024, 32, 256)}  # (L, N, T, d)
if FULL or HAS_CUDA:
    STM_SHAPES["released"] = (1, 10_240, 256, 4096)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _info(benchmark, device, dtype, nbytes):
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                dtype=str(dtype), bytes=nbytes, flops=0, torch=torch.__version__)


def _gbps(benchmark, nbytes):
    if benchmark.stats is not None and getattr(benchmark.stats, "stats", None) is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(STM_SHAPES))
@pytest.mark.parametrize("impl", ["drop_and_concat", "reference_op", "native"])
def test_stm_update(benchmark, impl, shape, device):
    if impl == "native":
        skip_unless_native("stm_update_", device)
    L, N, T, d = STM_SHAPES[shape]
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(L, N, d, generator=g).to(dtype).to(device)
    order = torch.arange(N).repeat(L, 1).to(device)
    drop = torch.stack([torch.randperm(N, generator=g)[:T] for _ in range(L)]).to(device)
    new = torch.randn(L, T, d, generator=g).to(dtype).to(device)
    if impl == "drop_and_concat":
        nbytes = 2 * L * N * d * pool.element_size()  # reads and writes the whole STM

        def run():
            out = drop_and_concat_reference(pool, drop, new)
            _sync(device)
            return out
    else:
        nbytes = 2 * L * T * d * pool.element_size()
        fn = stm_update_reference if impl == "reference_op" else torch.ops.mplus_fast.stm_update_

        def run():
            fn(pool, order, drop, new)
            _sync(device)
    _info(benchmark, device, dtype, nbytes)
    benchmark(run)
    _gbps(benchmark, nbytes)
