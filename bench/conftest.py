"""Shared benchmark helpers: the machine's own floors, measured in the same run.

Every engine benchmark reports achieved fractions of two floors measured here, now, on this
machine: the float32 matmul rate (FLOP/s of a large GEMM) and the memory read bandwidth (bytes/s
of a large reduction). CPU figures are only meaningful as ratios; absolute times count on a GPU.

Sizes: `MPLUS_FAST_BENCH_SIZE=mid` runs the issue's "CPU mid" geometry (minutes, GBs of memory);
the default `small` keeps CI's untimed run (`--benchmark-disable`) to seconds.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

SIZE = os.environ.get("MPLUS_FAST_BENCH_SIZE", "small")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best_of(fn, repeats=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="session")
def machine_floors() -> dict:
    """float32 GEMM FLOP/s and memory read bytes/s of this machine, measured now."""
    n = 2048 if SIZE != "small" else 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n ** 3 / _best_of(lambda: a @ b)
    big = torch.randn((256 if SIZE != "small" else 16) * 2 ** 20 // 4)
    bw = big.numel() * 4 / _best_of(lambda: big.sum())
    return {"matmul_flops": gemm, "read_bytes_per_s": bw, "threads": torch.get_num_threads()}
