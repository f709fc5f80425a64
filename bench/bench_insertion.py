"""stm_update_ (vs the reference's drop-and-concatenate) and assemble_rows (vs torch.cat).

Small shapes always (untimed in CI); the released geometry (N 10,240, T 256, d 4,096; assembly
of 1 + 2,560 + 10,240 + 512 rows) when CUDA is available or MPLUS_BENCH_FULL=1.
"""
from __future__ import annotations

import os

import pytest
import torch

import mplus_fast.ops  # noqa: F401
from mplus_fast.ops import build_info
from mplus_fast.ops.insertion import assemble_rows_reference, drop_and_concat_reference, stm_update_reference

FULL = os.environ.get("MPLUS_BENCH_FULL", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
STM_SHAPES = {"small": (1, 1024, 32, 256)}  # (L, N, T, d)
ASM_SHAPES = {"small": (1, 100, 64, 256, 16, 256)}  # (B, M, R, N, m, d)
if FULL or HAS_CUDA:
    STM_SHAPES["released"] = (1, 10_240, 256, 4096)
    ASM_SHAPES["released"] = (1, 20_000, 2560, 10_240, 512, 4096)


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
    if impl == "native" and not build_info()["ext_loaded"]:
        pytest.skip("native library not built")
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(ASM_SHAPES))
@pytest.mark.parametrize("impl", ["reference", "native"])
def test_assemble_rows(benchmark, impl, shape, device):
    if impl == "native" and not build_info()["ext_loaded"]:
        pytest.skip("native library not built")
    B, M, R, N, m, d = ASM_SHAPES[shape]
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    args = (t(d), t(M, d), torch.randint(0, M, (B, R), generator=g).to(device), t(N, d),
            torch.randperm(N, generator=g).to(device), t(B, m, d), t(d), 256)
    out = torch.empty(B, 1 + R + N + m, d, dtype=dtype, device=device)
    nbytes = 2 * out.numel() * out.element_size()
    fn = assemble_rows_reference if impl == "reference" else torch.ops.mplus_fast.assemble_rows

    def run():
        fn(*args, out)
        _sync(device)

    _info(benchmark, device, dtype, nbytes)
    benchmark(run)
    _gbps(benchmark, nbytes)
