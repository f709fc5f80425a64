"""Named ranges for profilers: NVTX (Nsight) when CUDA is present, and always
`torch.profiler.record_function`, so the same names appear in torch.profiler timelines (our GPU
machines have Nsight Compute but not Nsight Systems)."""
from __future__ import annotations

import contextlib
import os

import torch

_ENABLED = os.environ.get("MPLUS_FAST_PROFILE_RANGES", "1") != "0"


@contextlib.contextmanager
def nvtx_range(name: str):
    if not _ENABLED:
        yield
        return
    pushed = False
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        pushed = True
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if pushed:
            torch.cuda.nvtx.range_pop()
