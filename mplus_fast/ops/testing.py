"""Helpers for the op tests and benchmarks: a native kernel that is not loaded is a SKIP, never a pass.

Without mplus_fast._C every op falls back to its registered PyTorch reference, so a parity test of
`torch.ops.mplus_fast.<op>` against that reference would compare the reference with itself, and a
benchmark's "native" row would time the reference. `needs_native(op, device)` marks such a test
(or parameter) to skip, naming the reason; `skip_unless_native` does the same from inside a test.
"""
from __future__ import annotations

import torch

from mplus_fast.ops._library import has_native_kernel

__all__ = ["needs_native", "skip_unless_native", "native_reason"]


def native_reason(op: str, device: str | torch.device = "cpu") -> str:
    dev = torch.device(device).type
    return (f"mplus_fast::{op} has no native {dev} kernel loaded (mplus_fast._C missing or built without "
            f"{dev}): the op would run its PyTorch reference")


def needs_native(op: str, device: str | torch.device = "cpu"):
    """A pytest mark: skip unless `op` has its own kernel on `device`."""
    import pytest

    return pytest.mark.skipif(not has_native_kernel(op, device), reason=native_reason(op, device))


def skip_unless_native(op: str, device: str | torch.device = "cpu") -> None:
    import pytest

    if not has_native_kernel(op, device):
        pytest.skip(native_reason(op, device))
