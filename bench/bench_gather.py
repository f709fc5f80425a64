"""Benchmarks of mplus_fast::gather_rows and the PrefetchEngine.

CPU: reference (index_select, the package's gather_rows_reference; and index_select into a reused
buffer) vs the native threaded gather (allocating, and into a preallocated buffer as the prefetch
engine does), reporting GB/s (bytes = rows read + rows written). On CPU a fresh output's page
faults can cost more than the gather: compare allocating with allocating, out with out. Shapes: small ones always (CI runs this file untimed); the
released geometry (2,560 rows of 4,096 fp32 or of 2 x 1,024 bf16 K/V from a 153,600-row bank)
when CUDA is available or MPLUS_BENCH_FULL=1 (the fp32 bank is 2.5 GB).
CUDA: device-bank gather, zero-copy gather from the pinned bank, and the prefetch engine's
pinned -> device transfer overlapped with a matmul on another stream, reporting the fraction of
the transfer time hidden behind the matmul (extra_info["hidden_fraction"]).

    pytest bench/bench_gather.py --benchmark-only              # timed
    MPLUS_BENCH_FULL=1 pytest bench/bench_gather.py --benchmark-only -k cpu
    MPLUS_BENCH_THREADS=1 ...   # intra-op threads for the CPU runs (on an oversubscribed machine,
                                # every parallel region can stall for a scheduler tick)
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from mplus_fast.ops import has_native_kernel
from mplus_fast.ops.gather import gather_rows_reference
from mplus_fast.ops.testing import native_reason, skip_unless_native
from mplus_fast.prefetch import PrefetchEngine

CUDA = torch.cuda.is_available()
FULL = CUDA or os.environ.get("MPLUS_BENCH_FULL", "0") == "1"
NATIVE = has_native_kernel("gather_rows")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
THREADS = int(os.environ.get("MPLUS_BENCH_THREADS", "0"))  # 0: torch's default


@pytest.fixture(autouse=True)
def _threads():
    if THREADS <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)

# name -> (bank rows M, row shape, dtype, gathered rows R)
SHAPES = {
    "mid-kv-f32": (20_000, (2, 4, 64), torch.float32, 640),   # CPU-mid: a layer's retrieved K/V rows
    "small-4096f32": (4_096, (1_024,), torch.float32, 640),
    "small-kv-bf16": (4_096, (2, 256), torch.bfloat16, 640),
}
if FULL:
    SHAPES.update({
        "released-4096f32": (153_600, (4_096,), torch.float32, 2_560),
        "released-kv2x1024-bf16": (153_600, (2, 1_024), torch.bfloat16, 2_560),
    })


@functools.lru_cache(maxsize=4)
def bank_for(m: int, row: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    bank = torch.empty((m, *row), dtype=dtype, pin_memory=pinned)
    bank.view(m, -1)[:, :8].copy_(torch.arange(m * 8).view(m, 8))  # touched rows, cheap to build
    bank.view(m, -1)[:, 8:].fill_(1)
    return bank


def index_for(m: int, r: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, m, (r,), generator=torch.Generator().manual_seed(0)).to(device)


def record(benchmark, shape: str, r: int, row_bytes: int, impl: str, device: str) -> None:
    nbytes = 2 * r * row_bytes + 8 * r  # rows read + rows written + the index
    benchmark.extra_info.update({"shape": shape, "impl": impl, "rows": r, "row_bytes": row_bytes,
                                 "bytes": nbytes, "flops": 0, "device": device, "threads": torch.get_num_threads()})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 2)


def _ext(shape):
    m, row, dtype, r = SHAPES[shape]
    return m, row, dtype, r, torch.Size(row).numel() * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", [
    "reference",
    "reference_out",  # torch.index_select(..., out=buffer): the reference's best into a reused buffer
    "engine_indexing",  # bank[index]: what the fast backend's device placement runs (gather_split)
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=native_reason("gather_rows"))),
    pytest.param("native_out", marks=pytest.mark.skipif(not NATIVE, reason=native_reason("gather_rows"))),
])
def test_cpu_gather(benchmark, impl, shape):
    m, row, dtype, r, row_bytes = _ext(shape)
    bank, index = bank_for(m, row, dtype, False), index_for(m, r)
    if impl == "reference":
        fn = functools.partial(gather_rows_reference, bank, index)
    elif impl == "reference_out":
        out = torch.empty((r, *row), dtype=dtype)
        fn = functools.partial(torch.index_select, bank, 0, index, out=out)
    elif impl == "engine_indexing":
        fn = functools.partial(bank.__getitem__, index)
    elif impl == "native":
        fn = functools.partial(torch.ops.mplus_fast.gather_rows, bank, index)
    else:  # into a preallocated (pinned when CUDA) buffer: the prefetch engine's staging path
        out = torch.empty((r, *row), dtype=dtype, pin_memory=CUDA)
        fn = functools.partial(torch.ops.mplus_fast.gather_rows_out, bank, index, out)
    result = benchmark(fn)
    if result is not None:
        assert torch.equal(result, bank[index])
    record(benchmark, shape, r, row_bytes, impl, "cpu")


@needs_cuda
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["reference_device", "native_device", "native_zero_copy", "engine_staged",
                                  "engine_zero_copy"])
def test_cuda_gather(benchmark, impl, shape):
    if impl in ("native_device", "native_zero_copy") or impl == "engine_zero_copy":
        skip_unless_native("gather_rows", "cuda")
    m, row, dtype, r, row_bytes = _ext(shape)
    host = bank_for(m, row, dtype, True)
    index = index_for(m, r)
    if impl in ("reference_device", "native_device"):
        bank = host.cuda()
        fn_ = gather_rows_reference if impl == "reference_device" else torch.ops.mplus_fast.gather_rows
        idx = index.cuda()
        fn = lambda: fn_(bank, idx)  # noqa: E731
    elif impl == "native_zero_copy":
        idx = index.cuda()
        fn = lambda: torch.ops.mplus_fast.gather_rows(host, idx)  # noqa: E731
    else:
        engine = PrefetchEngine(host, device="cuda", num_staging=2, max_rows=r,
                                mode="staged" if impl == "engine_staged" else "zero_copy")
        fn = lambda: engine.request(index).wait()  # noqa: E731

    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    out = benchmark(timed)
    assert torch.equal(out.cpu(), host[index])
    record(benchmark, shape, r, row_bytes, impl, torch.cuda.get_device_name())
    if impl.startswith("engine"):
        engine.close()


def _cuda_time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@needs_cuda
@pytest.mark.parametrize("mode", ["staged", "zero_copy"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s.startswith("released")] or list(SHAPES))
def test_cuda_prefetch_overlap(benchmark, mode, shape):
    """Prefetch (host bank -> device) while a matmul runs on another stream: fraction hidden."""
    m, row, dtype, r, row_bytes = _ext(shape)
    host = bank_for(m, row, dtype, True)
    index = index_for(m, r)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    compute = torch.cuda.Stream()
    with PrefetchEngine(host, device="cuda", num_staging=2, max_rows=r, mode=mode) as engine:
        def matmul():
            with torch.cuda.stream(compute):
                for _ in range(4):
                    a @ a

        def transfer():
            engine.request(index).wait()

        def both():
            matmul()
            transfer()

        benchmark(lambda: (both(), torch.cuda.synchronize()))
        t_copy, t_mm, t_both = _cuda_time(transfer), _cuda_time(matmul), _cuda_time(both)
    hidden = max(0.0, min(1.0, (t_copy + t_mm - t_both) / t_copy))
    benchmark.extra_info.update({"shape": shape, "impl": f"prefetch_{mode}", "rows": r, "row_bytes": row_bytes,
                                 "bytes": r * row_bytes, "flops": 4 * 2 * 4096**3,
                                 "device": torch.cuda.get_device_name(),"t_copy_ms": t_copy * 1e3, "t_matmul_ms": t_mm * 1e3, "t_both_ms": t_both * 1e3,
                                 "hidden_fraction": round(hidden, 3),
                                 "copy_GB/s": round(r * row_bytes / t_copy / 1e9, 2)})
