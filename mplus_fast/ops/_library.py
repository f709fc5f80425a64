"""The `mplus_fast` op namespace: schema definitions, reference registration, native loading.

Pattern (pytorch/ao): schemas are defined here from Python so every op exists even when the
compiled library `mplus_fast._C` is absent. Each op's pure-PyTorch reference is registered as its
CompositeExplicitAutograd kernel; the native library adds CPU/CUDA kernels with
TORCH_LIBRARY_IMPL, which the dispatcher prefers. A reference kernel that runs on a CUDA tensor is
a silent slowdown in waiting, so it is logged (once per op). `MPLUS_FAST_REQUIRE_EXT=1` turns a
missing native library into an error (the GPU test run sets it).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("mplus_fast.ops")

NAMESPACE = "mplus_fast"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def require_ext() -> bool:
    return os.environ.get("MPLUS_FAST_REQUIRE_EXT", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def load_extension() -> bool:
    """Import the native library once; True when it is loaded."""
    try:
        importlib.import_module("mplus_fast._C")
    except ImportError as exc:
        if require_ext():
            raise RuntimeError(
                "MPLUS_FAST_REQUIRE_EXT=1 but the native library mplus_fast._C could not be loaded: "
                f"{exc}. Rebuild with `pip install --no-build-isolation -e .`."
            ) from exc
        logger.warning("mplus_fast._C is not available (%s); using the pure-PyTorch reference ops.", exc)
        return False
    return True


def build_info() -> dict:
    """What setup.py built (see mplus_fast/_build_info.py), plus whether it loaded."""
    try:
        from mplus_fast import _build_info as info
        built = {"ext_built": info.EXT_BUILT, "cuda_built": info.CUDA_BUILT, "torch": info.TORCH_VERSION}
    except ImportError:
        built = {"ext_built": False, "cuda_built": False, "torch": None}
    return {**built, "ext_loaded": load_extension()}


def has_native_kernel(op: str, device: str | torch.device = "cpu") -> bool:
    """True when `mplus_fast::<op>` has a kernel of its own for `device`'s dispatch key (a C++ /
    CUDA kernel of mplus_fast._C, or a Triton kernel registered for CUDA), i.e. when calling the op
    there does NOT run its PyTorch reference. Op tests and benchmarks skip on False."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)


def _touches_cuda(args, kwargs) -> bool:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return True
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) and v.is_cuda for v in value):
            return True
    return False


def define_op(schema: str, reference: Callable, fake: Callable | None = None) -> Callable:
    """Define `mplus_fast::<name>` from `schema`, with `reference` as its fallback kernel.

    Returns the OpOverload-packet callable (`torch.ops.mplus_fast.<name>`).
    """
    name = schema.split("(", 1)[0].strip()
    LIB.define(schema)
    warned = False

    @functools.wraps(reference)
    def fallback(*args, **kwargs):
        nonlocal warned
        if not warned and _touches_cuda(args, kwargs):
            warned = True
            logger.warning("mplus_fast::%s has no native CUDA kernel loaded; running the PyTorch reference.", name)
        return reference(*args, **kwargs)

    LIB.impl(name, fallback, "CompositeExplicitAutograd")
    if fake is not None:
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    return getattr(torch.ops.mplus_fast, name)
